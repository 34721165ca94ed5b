"""Request validation: each bad value is refused with a message naming the field and the allowed values."""

from __future__ import annotations

import pytest

from engine.config import DEFAULT_NEGATIVE_PROMPT, SUPPORTED_SIZES
from engine.request import RequestError, RequestLimits, validate_request

REAL = RequestLimits(model="14B", sizes=SUPPORTED_SIZES["14B"], count_tokens=lambda s: len(s.split()) + 1)
TINY = RequestLimits(model="tiny", sizes=("256*256", "208*144"), any_multiple_of_16=True)


def bad(raw, limits=REAL):
    with pytest.raises(RequestError) as e:
        validate_request({"prompt": "a fox", **raw}, limits)
    return str(e.value)


def test_defaults_and_negative_prompt():
    req = validate_request({"prompt": "  a fox\x00 in snow "}, REAL)
    assert req.prompt == "a fox in snow"
    assert req.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert (req.width, req.height, req.frame_num, req.sample_steps) == (1280, 720, 81, 50)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"prompt": ""}, "prompt: must not be empty"),
        ({"prompt": "\x01\x02 \x7f"}, "prompt: must not be empty"),
        ({"prompt": "x" * 10_000}, "prompt: must be at most 2000 characters, got 10000"),
        ({"prompt": "w " * 600}, "prompt: must be at most 512 tokens, got 601"),
        ({"frame_num": 80}, "frame_num: must be 4n+1 between 1 and 241 (e.g. 17, 33, 81), got 80"),
        ({"frame_num": 245}, "frame_num: must be between 1 and 241, got 245"),
        ({"frame_num": "abc"}, "frame_num: must be an integer between 1 and 241, got 'abc'"),
        ({"sample_steps": 0}, "sample_steps: must be between 1 and 200, got 0"),
        ({"sample_steps": 2.5}, "sample_steps: must be an integer between 1 and 200, got 2.5"),
        ({"sample_guide_scale": float("nan")}, "sample_guide_scale: must be a finite number between 0 and 20, got nan"),
        ({"sample_shift": float("inf")}, "sample_shift: must be a finite number greater than 0 and at most 20, got inf"),
        ({"sample_shift": -1}, "sample_shift: must be greater than 0 and at most 20, got -1"),
        ({"sample_shift": 0}, "sample_shift: must be greater than 0 and at most 20, got 0"),
        ({"frame_num": 10**400}, "frame_num: must be between 1 and 241, got an integer of 401 digits"),
        ({"prompt": "a cat \ud800"}, "prompt: must be valid Unicode text; character 6 is an unpaired surrogate '\\ud800'"),
        ({"base_seed": 2**32}, "base_seed: must be between -1 and 4294967295, got 4294967296"),
        ({"base_seed": True}, "base_seed: must be an integer between -1 and 4294967295, got True"),
        ({"sample_solver": "ddim"}, "sample_solver: must be one of unipc, euler, dpm++, got 'ddim'"),
        ({"size": "100*100"}, "size: 100*100 is not supported by the 14B model; choose one of 1280*720, 720*1280, 832*480, 480*832"),
        ({"size": "../../etc/passwd"}, "size: must look like W*H, one of 1280*720, 720*1280, 832*480, 480*832, got '../../etc/passwd'"),
    ],
)
def test_bad_values_name_the_field(raw, message):
    assert bad(raw) == message


def test_tiny_model_accepts_any_multiple_of_16():
    req = validate_request({"prompt": "a", "size": "320*176"}, TINY)
    assert (req.width, req.height) == (320, 176)
    assert bad({"size": "100*100"}, TINY) == (
        "size: the tiny model takes W*H with W and H multiples of 16 between 16 and 1920, got 100*100"
    )


def test_random_seed_is_resolved_once():
    req = validate_request({"prompt": "a", "base_seed": -1}, REAL)
    assert req.base_seed == -1
    fixed = req.with_seed()
    assert 0 <= fixed.base_seed <= 2**32 - 1
    assert fixed.with_seed() == fixed
