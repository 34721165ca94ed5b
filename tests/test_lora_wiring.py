"""Issue 16 wired into the product: --lora / request `loras` (validated on rank 0, applied and agreed on every
rank), --sample_timesteps / the 4-step distilled preset, TeaCache off below 10 steps, and what the sidecar says."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app import load_config
from engine.cli import merge_config
from engine.request import GenerationRequest, RequestError, RequestLimits, validate_request
from engine.scheduler import DistilledScheduler, make_scheduler
from parallel.lora import LoraRefused, apply_request_loras, lora_state
from tests.lora_util import BLOCKS, fresh, run, spec, write
from tests.test_lora import base_sd  # noqa: F401 - the fixture

SEEN = [1000.0, 937.5, 2500.0 / 3.0, 625.0]


# ----------------------------------------------------------------------------------------------------
# distilled sampling
# ----------------------------------------------------------------------------------------------------
def test_distilled_grid_is_the_shifted_list_the_model_sees():
    s = make_scheduler("euler", 4, 5.0, (1000, 750, 500, 250))
    assert isinstance(s, DistilledScheduler) and len(s) == 4
    assert s.timesteps.tolist() == pytest.approx(SEEN, abs=1e-9)
    assert s.timesteps[1].item() == 937.5 and s.timesteps[3].item() == 625.0
    assert s.sigmas.tolist() == pytest.approx([1.0, 0.9375, 0.8333333, 0.625, 0.0], abs=1e-7)


def test_distilled_step_is_x0_renoised_to_the_next_sigma():
    s = make_scheduler("euler", 4, 5.0, (1000, 750, 500, 250))
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    out = s.step(v, 0, x)
    x0 = x - 1.0 * v
    assert torch.equal(out, x0 + s.sigmas[1] * v)
    # a perfect velocity of a point mass (v = noise − x0) lands on it in 4 steps
    s.reset()
    target, noise = torch.randn(5), torch.randn(5)
    x = noise.clone()
    for i in range(4):
        x = s.step(noise - target, i, x)
    assert torch.allclose(x, target, atol=1e-6)


LIMITS = RequestLimits(model="tiny", sizes=("208*144",), any_multiple_of_16=True)


def test_sample_timesteps_per_request_set_steps_and_solver():
    req = validate_request({"prompt": "a", "sample_timesteps": "1000, 750,500,250"}, LIMITS)
    assert req.sample_timesteps == (1000.0, 750.0, 500.0, 250.0)
    assert (req.sample_steps, req.sample_solver) == (4, "euler")
    assert validate_request({"prompt": "a", "sample_timesteps": [900, 100], "sample_steps": 2}, LIMITS).sample_steps == 2


@pytest.mark.parametrize("raw, message", [
    ({"sample_timesteps": "1000,750,750"}, "sample_timesteps: must be strictly decreasing, got 1000,750,750"),
    ({"sample_timesteps": "1000,x"}, "sample_timesteps: must be a number greater than 0 and at most 1000, got 'x'"),
    ({"sample_timesteps": [1001]}, "sample_timesteps: must be greater than 0 and at most 1000, got 1001"),
    ({"sample_timesteps": [0]}, "sample_timesteps: must be greater than 0 and at most 1000, got 0"),
    ({"sample_timesteps": 5}, "sample_timesteps: must be a list of numbers like 1000,750,500,250, got '5'"),
    ({"sample_timesteps": "1000,500", "sample_steps": 4},
     "sample_steps: must equal the number of sample_timesteps (2), got 4"),
    ({"sample_timesteps": "1000,500", "sample_solver": "unipc"},
     "sample_solver: explicit sample_timesteps use the distilled Euler update; set sample_solver to euler, got 'unipc'"),
])
def test_bad_sample_timesteps_are_refused_with_exact_messages(raw, message):
    with pytest.raises(RequestError) as info:
        validate_request({"prompt": "a", **raw}, LIMITS)
    assert str(info.value) == message


def test_default_timesteps_apply_to_their_own_step_count_only():
    defaults = {"sample_timesteps": "1000,750,500,250", "sample_steps": 4, "sample_solver": "unipc"}
    assert validate_request({"prompt": "a"}, LIMITS, defaults).sample_timesteps == (1000, 750, 500, 250)
    other = validate_request({"prompt": "a", "sample_steps": 20}, LIMITS, defaults)
    assert (other.sample_timesteps, other.sample_steps, other.sample_solver) == ((), 20, "unipc")


def test_distilled_preset_and_flags():
    cfg = load_config(["--preset", "distilled_4step", "--prompt", "x"])
    assert (cfg.sample_timesteps, cfg.sample_steps, cfg.sample_shift, cfg.sample_guide_scale, cfg.sample_solver) == (
        "1000,750,500,250", 4, 5, 1, "euler")
    cfg = load_config(["--sample_timesteps", "1000,750,500,250", "--prompt", "x"])
    assert cfg.sample_timesteps == "1000,750,500,250"
    with pytest.raises(RequestError, match="^sample_timesteps: must be strictly decreasing, got 500,750$"):
        load_config(["--sample_timesteps", "500,750"])


# ----------------------------------------------------------------------------------------------------
# --lora and the request field `loras`
# ----------------------------------------------------------------------------------------------------
def test_lora_flag_is_repeatable_and_a_preset_may_carry_a_list(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    cfg = load_config(["--lora", f"{a}:0.5", "--lora", str(b), "--model_dir", str(tmp_path)])
    assert cfg.lora == (f"{a}:0.5", str(b))
    assert merge_config({"lora": [str(a)]}, {}).lora == (str(a),)
    with pytest.raises(RequestError) as info:
        load_config(["--lora", "missing.safetensors:0.5", "--model_dir", str(tmp_path)])
    assert str(info.value) == (f"lora: LoRA file not found: 'missing.safetensors' is neither a file nor a LoRA in "
                               f"{tmp_path / 'loras'}")
    with pytest.raises(RequestError, match=r"^lora: strength 9.0 is out of range; allowed -4 to 4$"):
        load_config(["--lora", f"{a}:9"])


@pytest.fixture
def models(tmp_path) -> Path:
    (tmp_path / "loras" / "style").mkdir(parents=True)
    for name in ("a.safetensors", "style/b.safetensors"):
        (tmp_path / "loras" / name).write_bytes(b"x")
    return tmp_path


def test_request_loras_resolve_to_files_in_the_loras_folder(models):
    limits = RequestLimits(model="tiny", sizes=("208*144",), any_multiple_of_16=True, models_dir=str(models))
    req = validate_request({"prompt": "a", "loras": [{"name": "a.safetensors", "strength": 0.5},
                                                     ["style/b.safetensors", -1]]}, limits)
    assert req.loras == ((str(models / "loras" / "a.safetensors"), 0.5),
                         (str(models / "loras" / "style" / "b.safetensors"), -1.0))
    assert GenerationRequest(**req.to_dict()) == req  # what the broadcast rebuilds
    defaults = {"loras": (("/x/c.safetensors", 0.8),)}
    assert validate_request({"prompt": "a"}, limits, defaults).loras == (("/x/c.safetensors", 0.8),)
    assert validate_request({"prompt": "a", "loras": []}, limits, defaults).loras == ()


def test_bad_request_loras_are_refused_naming_the_field(models):
    limits = RequestLimits(model="tiny", sizes=("208*144",), any_multiple_of_16=True, models_dir=str(models))
    root = models / "loras"
    cases = [
        ([{"name": "nope.safetensors"}], f"loras: no LoRA named 'nope.safetensors' in {root}"),
        ([{"name": "a.safetensors", "strength": 9}], "loras: strength 9 is out of range; allowed -4 to 4"),
        ([{"name": "a.safetensors", "strength": "x"}], "loras: strength 'x' is not a number; allowed -4 to 4"),
        ([{"name": "../a.safetensors"}], f"loras: '../a.safetensors' is not a file in {root}; pick one of the listed LoRAs"),
        ("a.safetensors", "loras: must be a list of {name, strength}, got str"),
        ([["a.safetensors"]], "loras: each entry must be {name, strength} or [name, strength], got \"['a.safetensors']\""),
        ([{"name": "a.safetensors"}, ["a.safetensors", 1]],
         f"loras: 'a.safetensors' is listed twice; in {root} each LoRA appears once (set its strength instead)"),
        ([["a.safetensors", 1]] * 5, "loras: at most 4 LoRAs per request, got 5"),
    ]
    for value, message in cases:
        with pytest.raises(RequestError) as info:
            validate_request({"prompt": "a", "loras": value}, limits)
        assert (str(info.value), info.value.field) == (message, "loras")


# ----------------------------------------------------------------------------------------------------
# applying a request's LoRAs on every rank, agreed
# ----------------------------------------------------------------------------------------------------
class FakeGang:
    """Rank 0 of a gang whose other ranks answered `others` in the agreement."""

    def __init__(self, others: list[tuple[bool, str]]) -> None:
        self.rank, self.others, self.rounds = 0, others, 0

    def all_gather_object(self, obj):
        self.rounds += 1
        return [obj, *self.others]


def test_request_loras_are_applied_once_and_a_failure_on_any_rank_restores_the_previous_set(base_sd, tmp_path):  # noqa: F811
    a = write(spec(base_sd, 3, BLOCKS), "official", tmp_path / "a.safetensors")
    b = write(spec(base_sd, 4, BLOCKS[:4]), "official", tmp_path / "b.safetensors")
    pipe = SimpleNamespace(dit=fresh(base_sd))
    plain = run(pipe.dit)
    quiet = FakeGang([(True, "")])
    assert apply_request_loras(pipe, quiet, ()).to_dict() == {"loras": [], "changed": 0, "restored": 0, "seconds": 0.0}
    assert quiet.rounds == 0  # no LoRA wanted nor installed: no collective at all
    first = apply_request_loras(pipe, quiet, ((str(a), 1.0),))
    assert first.changed == len(BLOCKS) and quiet.rounds == 1
    with_a = run(pipe.dit)
    again = apply_request_loras(pipe, quiet, ((str(a), 1.0),))
    assert (again.changed, again.restored, [r.name for r in again.loras]) == (0, 0, ["a.safetensors"])
    with pytest.raises(LoraRefused) as info:
        apply_request_loras(pipe, FakeGang([(False, "LoRA file not found: /elsewhere/b.safetensors")]),
                            ((str(a), 0.5), (str(b), 1.0)))
    assert str(info.value) == "rank 1: LoRA file not found: /elsewhere/b.safetensors"
    assert torch.equal(run(pipe.dit), with_a)  # back to the set every rank has
    assert lora_state(pipe.dit).active == ((str(a), 1.0),)
    with pytest.raises(LoraRefused) as info:
        apply_request_loras(pipe, quiet, ((str(tmp_path / "gone.safetensors"), 1.0),))
    assert str(info.value) == f"rank 0: LoRA file not found: {tmp_path / 'gone.safetensors'}"
    assert torch.equal(run(pipe.dit), with_a)
    restored = apply_request_loras(pipe, quiet, ())
    assert restored.restored == len(BLOCKS) and torch.equal(run(pipe.dit), plain)


# ----------------------------------------------------------------------------------------------------
# the production server: LoRA, distilled timesteps and TeaCache in the result and the sidecar
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    from tests.conftest import production_server

    return production_server(tiny_model_dir)


def tiny_lora(server, path: Path) -> Path:
    """A LoRA of two tiny-model layers, in the official format."""
    sd = {k: v.detach().float() for k, v in server.pipe.dit.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write(spec(sd, 7, ["blocks.0.self_attn.q", "blocks.0.ffn.0"]), "official", path)


def test_server_applies_request_loras_and_the_sidecar_records_them(tiny_server, tiny_model_dir):
    from parallel.outputs import sidecar_meta

    tiny_lora(tiny_server, tiny_model_dir / "loras" / "tiny_style.safetensors")
    raw = {"prompt": "a cat", "size": "32*32", "frame_num": 1, "sample_steps": 2, "base_seed": 3,
           "loras": [{"name": "tiny_style.safetensors", "strength": 0.7}]}
    req = tiny_server.dispatcher.validate(raw)
    out = tiny_server.execute(req, {"decode": False})
    meta = sidecar_meta(tiny_server, out, 0)["loras"]
    assert [(r["name"], r["strength"], r["tensors"], r["skipped"], r["unmatched"]) for r in meta["loras"]] == [
        ("tiny_style.safetensors", 0.7, 2, 0, 0)]
    assert meta["changed"] == 2
    plain = tiny_server.execute(tiny_server.dispatcher.validate({**raw, "loras": []}), {"decode": False})
    assert sidecar_meta(tiny_server, plain, 0)["loras"]["restored"] == 2
    assert not torch.equal(plain.latents, out.latents)


def test_server_runs_the_distilled_preset_with_one_forward_per_step_and_no_teacache(tiny_server, caplog):
    from parallel.outputs import sidecar_meta

    seen: list[float] = []
    forward = tiny_server.pipe.model_forward

    def spy(x, t, ctx, branch):
        seen.append(float(t[0]))
        return forward(x, t, ctx, branch)

    tiny_server.pipe.model_forward = spy
    tiny_server.pipe._teacache_off_logged = False
    raw = {"prompt": "a cat", "size": "32*32", "frame_num": 1, "base_seed": 3, "sample_timesteps": "1000,750,500,250",
           "sample_shift": 5, "sample_guide_scale": 1, "teacache": 0.2}
    try:
        with caplog.at_level(logging.INFO, logger="wan.pipeline"):
            for _ in range(2):
                out = tiny_server.execute(tiny_server.dispatcher.validate(raw), {"decode": False})
    finally:
        del tiny_server.pipe.model_forward
    assert seen == pytest.approx(SEEN * 2, abs=1e-4)
    meta = sidecar_meta(tiny_server, out, 0)
    assert meta["timesteps"] == pytest.approx(SEEN, abs=1e-9) and meta["sample_timesteps"] == [1000, 750, 500, 250]
    assert (meta["steps"], meta["solver"], meta["dit_forwards"]) == (4, "euler", 4)
    assert meta["teacache_disabled_reason"] == "TeaCache is off below 10 steps (this request has 4)"
    assert [r.message for r in caplog.records].count("TeaCache is off below 10 steps (this request has 4)") == 1


def test_headless_run_with_a_lora_flag_and_the_distilled_preset(tiny_server, tiny_model_dir, tmp_path):
    import json

    from tests.test_engine import run_app

    lora = tiny_lora(tiny_server, tmp_path / "models" / "loras" / "head.safetensors")
    save = tmp_path / "fox.mp4"
    proc = run_app(["--prompt", "a fox", "--size", "32*32", "--frame_num", "1", "--base_seed", "1",
                    "--preset", "distilled_4step", "--model_dir", str(tmp_path / "models"), "--lora", "head.safetensors:0.25",
                    "--save_file", str(save)], tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(save.with_suffix(".json").read_text())
    assert meta["timesteps"] == pytest.approx(SEEN, abs=1e-9) and (meta["steps"], meta["dit_forwards"]) == (4, 4)
    assert [(r["path"], r["strength"]) for r in meta["loras"]["loras"]] == [(str(lora), 0.25)]
    bad = run_app(["--prompt", "a fox", "--model_dir", str(tmp_path / "models"), "--lora", "nope.safetensors"],
                  tiny_model_dir)
    assert bad.returncode == 2
    assert (f"error: --lora: LoRA file not found: 'nope.safetensors' is neither a file nor a LoRA in "
            f"{tmp_path / 'models' / 'loras'}") in bad.stderr
