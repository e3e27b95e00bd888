"""Where a user meets ParallelPrefix's backbone default, they are told that FedPerfix trains the whole ViT."""

from __future__ import annotations

import io

import timm
import torch

from fedpeft import VPT, ParallelPrefix, protocols


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2)


def test_the_summary_of_a_frozen_backbone_says_fedperfix_trains_the_whole_vit():
    out = io.StringIO()
    ParallelPrefix(_vit(), bottleneck=4).print_trainable_parameters("fedperfix", file=out)
    notes = [line for line in out.getvalue().splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "FedPerfix" in notes[0] and "train_backbone=True" in notes[0]
    assert ParallelPrefix(VPT(_vit(), num_prompts=2), bottleneck=4).summary().notes  # around a wrapper too


def test_no_note_when_the_backbone_trains_as_in_fedperfix():
    s = ParallelPrefix(_vit(), bottleneck=4, train_backbone=True).summary()
    assert s.notes == () and "note:" not in str(s)
    built = protocols.method("FedPerfix").build(_vit(), bottleneck=4)
    assert built.summary().notes == ()
    vit = built.unwrap()
    assert all(p.requires_grad for p in vit.parameters())  # the preset trains the whole ViT
