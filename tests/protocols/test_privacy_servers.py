"""User-level DP in the servers and the in-process engine: DP-FedAvg's step, pFedPG's private generator step, the
round record's ε, checkpoints and resume, and the refusals.

Oracles: explicit sums over hand-made updates; the non-private pFedPG server with the rate scaled by m; the
empirical law of the noise; an uninterrupted run for a resumed one.
"""

from __future__ import annotations

import math

import pytest
import torch
from protocol_models import client_data, model_for

from fedpeft import protocols
from fedpeft.protocols import AveragingServer, CheckpointError, Federation, PFedPG, Privacy, RoundLog

pytest.importorskip("dp_accounting")


def _server(privacy, shape=(6,), clients=10, seed=0):
    return AveragingServer({"w": torch.zeros(shape)}, num_clients=clients, privacy=privacy, seed=seed)


def test_a_million_norm_update_is_refused_and_a_clipped_one_moves_the_aggregate_by_at_most_c_over_m():
    C, ids = 0.5, [0, 3, 4, 7]  # m = 4
    torch.manual_seed(0)
    honest = {n: torch.randn(6) * 0.05 for n in ids[:3]}  # norms well below C: unclipped
    hostile = torch.full((6,), 1e6 / math.sqrt(6))  # norm 1e6
    server = _server(Privacy(C, 0.0))
    server.payloads(ids)
    report = server.update([(n, {"w": u}, 10) for n, u in honest.items()] + [(7, {"w": hostile}, 10)])
    assert report.accepted == ids[:3] and [r.client_id for r in report.rejected] == [7]
    assert "clip_norm" in report.rejected[0].reason
    expected = sum(honest.values()) / 4  # equal weights, fixed denominator m = 4
    torch.testing.assert_close(server.shared["w"], expected)

    # the same client clipping on its side (what client_update does) is accepted, and moves the aggregate <= C / m
    with_it, without = _server(Privacy(C, 0.0)), _server(Privacy(C, 0.0))
    clipped = protocols.privacy.clip_upload({"w": hostile}, {"w": torch.zeros(6)}, C)
    for s, extra in ((with_it, [(7, clipped, 10)]), (without, [])):
        s.payloads(ids)
        s.update([(n, {"w": u}, 10) for n, u in honest.items()] + extra)
    moved = (with_it.shared["w"] - without.shared["w"]).double().norm().item()
    assert moved <= C / 4 * (1 + 1e-6) and moved > C / 4 * 0.999


def test_reported_weights_do_not_weigh_the_private_average():
    server = _server(Privacy(100.0, 0.0), clients=3)
    server.payloads([0, 1])
    server.update([(0, {"w": torch.ones(6)}, 1), (1, {"w": 3 * torch.ones(6)}, 1000)])
    torch.testing.assert_close(server.shared["w"], torch.full((6,), 2.0))  # (1 + 3) / 2, not sample-weighted


def test_averaging_noise_has_std_sigma_c_over_m_and_is_reproducible_per_seed():
    sigma, C, ids = 1.5, 0.2, [1, 2, 5]
    servers = [_server(Privacy(C, sigma), shape=(100, 100), seed=s) for s in (7, 7, 8)]
    for s in servers:
        s.payloads(ids)
        s.update([(n, {"w": torch.zeros(100, 100)}, 1) for n in ids])  # zero updates: the step is the noise
    z = servers[0].shared["w"].flatten()  # 10,000 draws: relative standard error of the std 0.71 %; tolerance 3 %
    assert abs(z.std().item() / (sigma * C / 3) - 1) < 0.03
    assert torch.equal(servers[0].shared["w"], servers[1].shared["w"])
    assert not torch.equal(servers[0].shared["w"], servers[2].shared["w"])
    torch.manual_seed(11)  # seed=None: the noise seed comes from torch's global RNG, like a server's other draws
    a = AveragingServer({"w": torch.zeros(4)}, num_clients=3, privacy=Privacy(1.0, 1.0))
    torch.manual_seed(11)
    b = AveragingServer({"w": torch.zeros(4)}, num_clients=3, privacy=Privacy(1.0, 1.0))
    assert a.privacy.seed == b.privacy.seed


def test_a_round_without_replies_is_still_a_noisy_release_and_is_accounted():
    server = _server(Privacy(1.0, 1.0))
    server.payloads([0, 1])
    report = server.update([])
    assert report.updated and not torch.equal(server.shared["w"], torch.zeros(6))
    assert report.privacy["rounds"] == 1 and report.privacy["sampling_rate"] == 0.2
    assert math.isfinite(report.privacy["epsilon"]) and report.privacy["epsilon"] > 0


def _pfedpg_pair(lr, m, clip=1e9, sigma=0.0):
    model = model_for("pFedPG")
    plain = PFedPG(server_optimizer="SGD", server_lr=lr, server_steps=2).make_server(model, num_clients=5, seed=3)
    private = PFedPG(server_optimizer="SGD", server_lr=lr * m, server_steps=2).make_server(
        model, num_clients=5, seed=3, privacy=Privacy(clip, sigma))
    return plain, private


def test_pfedpg_private_step_without_clipping_or_noise_is_the_plain_step_over_m():
    ids, lr = [0, 2, 4], 0.01
    plain, private = _pfedpg_pair(lr, len(ids))
    for s in (plain, private):
        sent = s.payloads(ids)
        torch.manual_seed(4)
        s.update([(n, {k: v + torch.randn_like(v) for k, v in sent[n].items()}, 1) for n in ids])
    for (name, a), b in zip(plain.generator.named_parameters(), private.generator.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_pfedpg_private_round_records_epsilon_and_a_round_without_replies_still_steps():
    _, private = _pfedpg_pair(0.1, 1, clip=0.1, sigma=1.0)
    before = [p.detach().clone() for p in private.generator.parameters()]
    private.payloads([1, 3])
    report = private.update([])
    assert report.updated and report.privacy["rounds"] == 1 and report.privacy["sampling_rate"] == 0.4
    assert all(not torch.equal(a, b) for a, b in zip(before, private.generator.parameters()))


@pytest.mark.parametrize("method", ["FedVPT", "pFedPG"])
def test_a_resumed_federation_continues_epsilon_and_state_bit_for_bit(method, tmp_path):
    data, p = client_data(4, n=8), Privacy(0.05, 0.8)

    def federation(ckpt=None):
        torch.manual_seed(0)
        return Federation(method, model_for(method), data, test_data=data, fraction=0.5, seed=1, privacy=p,
                          checkpoint_dir=ckpt)

    uninterrupted = federation()
    whole = uninterrupted.run(3)
    first = federation(tmp_path)
    first.run(1)
    first.close()  # the checkpoint folder has one writer at a time (issue 27's lock)
    resumed = federation(tmp_path)
    assert len(resumed.history) == 1
    rest = resumed.run(2)
    for a, b in zip(whole, first.history + rest):
        da, db = a.as_dict(), b.as_dict()
        da.pop("wall_s"), db.pop("wall_s")
        assert da == db
    assert [r.server.privacy["epsilon"] for r in whole] == sorted({r.server.privacy["epsilon"] for r in whole})
    assert whole[-1].server.privacy["rounds"] == 3
    (ta, ma), (tb, mb) = uninterrupted.server.state_dict(), resumed.server.state_dict()
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ma["privacy"] == mb["privacy"]


def test_a_checkpoint_with_other_privacy_settings_or_none_is_refused(tmp_path):
    data = client_data(3, n=8)

    def federation(privacy):
        torch.manual_seed(0)
        return Federation("FedVPT", model_for("FedVPT"), data, seed=1, privacy=privacy, checkpoint_dir=tmp_path)

    federation(Privacy(0.1, 1.0)).run(1)
    for other in (Privacy(0.1, 2.0), Privacy(0.2, 1.0), None):
        with pytest.raises(CheckpointError, match="privacy"):
            federation(other)
    (tmp_path / "other").mkdir()
    torch.manual_seed(0)
    Federation("FedVPT", model_for("FedVPT"), data, seed=1, checkpoint_dir=tmp_path / "other").run(1)
    with pytest.raises(CheckpointError, match="privacy"):
        torch.manual_seed(0)
        Federation("FedVPT", model_for("FedVPT"), data, seed=1, privacy=Privacy(0.1, 1.0),
                   checkpoint_dir=tmp_path / "other")


def test_epsilon_reaches_the_round_log_and_is_absent_without_privacy(tmp_path):
    data = client_data(3, n=8)
    torch.manual_seed(0)
    Federation("FedVPT", model_for("FedVPT"), data, privacy=Privacy(0.1, 1.0),
               round_log=RoundLog(tmp_path / "dp.jsonl", tensorboard=False)).run(2)
    rows = RoundLog.read(tmp_path / "dp.jsonl")
    assert [r["privacy"]["rounds"] for r in rows] == [1, 2]
    assert rows[1]["privacy"]["epsilon"] > rows[0]["privacy"]["epsilon"] > 0
    assert set(rows[0]["privacy"]) >= {"epsilon", "delta", "noise_multiplier", "clip_norm", "sampling_rate", "releases"}
    torch.manual_seed(0)
    plain = Federation("FedVPT", model_for("FedVPT"), data, round_log=RoundLog(tmp_path / "p.jsonl", tensorboard=False))
    plain.run(1)
    assert "privacy" not in RoundLog.read(tmp_path / "p.jsonl")[0]
    assert "privacy" not in plain.server.state_dict()[1]


def test_settings_a_method_cannot_honour_are_refused_naming_privacy():
    data, p = client_data(3, n=8), Privacy(0.1, 1.0)
    with pytest.raises(ValueError, match=r"^privacy"):
        Federation("Local", model_for("Local"), data, privacy=p)
    with pytest.raises(ValueError, match=r"^privacy"):
        PFedPG(normalize_delta=True).make_server(model_for("pFedPG"), num_clients=3, privacy=p)
    model = model_for("FedVPT")
    with pytest.raises(ValueError, match=r"^privacy"):
        Federation("FedVPT", model, data, privacy=p, server=protocols.get("FedVPT").make_server(model, num_clients=3))
    with pytest.raises(ValueError, match=r"^privacy"):
        AveragingServer({"w": torch.zeros(2)}, privacy=p)  # no num_clients: no sampling rate
    server = _server(p)
    with pytest.raises(ValueError, match=r"^privacy"):
        server.update([])  # no payloads(): no denominator
    assert server.round == 0 and server.privacy.ledger.rounds == 0


def test_a_drawn_client_without_a_node_keeps_the_denominator_and_the_sampling_rate():
    from fedpeft.protocols.server_privacy import note_sample

    server = _server(Privacy(100.0, 0.0))
    note_sample(server, 4)  # the engine drew 4 clients; 2 had no live node and were not sent anything
    server.payloads([0, 1])
    report = server.update([(0, {"w": torch.ones(6)}, 1), (1, {"w": torch.ones(6)}, 1)])
    torch.testing.assert_close(server.shared["w"], torch.full((6,), 0.5))  # (1 + 1) / 4
    assert report.privacy["sampling_rate"] == 0.4
    server.payloads([0, 1])  # the note is per round
    assert server.update([]).privacy["sampling_rate"] == 0.2


def test_every_pfedpg_server_step_is_a_release_and_a_data_dependent_stop_is_refused():
    import dp_accounting as dpa

    model, p = model_for("pFedPG"), Privacy(0.1, 1.5)
    server = PFedPG(server_steps=3).make_server(model, num_clients=5, seed=3, privacy=p)
    for _ in range(2):
        sent = server.payloads([0, 2])
        report = server.update([(n, {k: v + 0.1 for k, v in sent[n].items()}, 1) for n in (0, 2)])
    assert report.diagnostics["steps"] == 3 and report.privacy["releases"] == 3
    assert report.privacy["total_releases"] == 6 and report.privacy["rounds"] == 2
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    inner = dpa.dp_event.SelfComposedDpEvent(dpa.dp_event.GaussianDpEvent(1.5 / 2), 3)  # 3 steps on one sample
    acc.compose(dpa.dp_event.SampledWithoutReplacementDpEvent(5, 2, inner), 2)
    assert report.privacy["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(ValueError, match=r"^privacy"):
        PFedPG(server_steps=3, server_tol=1e-3).make_server(model, num_clients=5, privacy=p)
