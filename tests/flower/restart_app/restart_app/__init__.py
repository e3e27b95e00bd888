"""fedpeft's real-process restart test app: FedPGP (shared global prompt, personal U/V and head) on a tiny ViT."""
