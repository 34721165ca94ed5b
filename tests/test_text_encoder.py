"""umt5 text encoder: key maps, config inference, tokenizers, prompt cleaning and parity with the Wan math."""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import UMT5EncoderModel

from engine.config import DEFAULT_NEGATIVE_PROMPT
from engine.text_encoder import (
    TextEncoder,
    build_tiny_tokenizer,
    clean_prompt,
    is_wan_t5,
    load_tokenizer,
    spiece_model_bytes,
    t5_config_from_state_dict,
    t5_hf_to_wan,
    t5_key_hf_to_wan,
    t5_key_wan_to_hf,
    t5_wan_to_hf,
    text_encoder_from_state_dict,
)
from tests.conftest import reference_file
from tests.t5_reference import random_wan_t5, wan_t5_encode

KEYS_TSV = reference_file("reference/keys/keys_t5.tsv")
VOCAB, DIM, LAYERS, HEADS, D_FF = 2048, 64, 2, 4, 128
PROMPTS = ["A cat walks on the grass.", "a red car drives fast along the wide coast road at sunset " * 12]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_tokenizer(d, vocab_size=VOCAB)
    return d


@pytest.fixture(scope="module")
def tokenizer(tiny_tok_dir):
    return load_tokenizer(tiny_tok_dir)


@pytest.fixture(scope="module")
def wan_sd() -> dict[str, torch.Tensor]:
    return random_wan_t5(VOCAB, DIM, LAYERS, HEADS, D_FF, seed=0)


@pytest.fixture(scope="module")
def encoder(wan_sd, tokenizer) -> TextEncoder:
    return text_encoder_from_state_dict(wan_sd, tokenizer, "cpu", torch.float32)


def _train_spiece(byte_fallback: bool = True) -> bytes:
    """A small sentencepiece Unigram model trained (deterministically, in memory) on built-in text."""
    words = " ".join(PROMPTS + ["the quick brown fox jumps over the lazy dog near a river bank"] * 3).split()
    corpus = [" ".join(words[i : i + 12]) for i in range(0, len(words), 3)]
    corpus += [DEFAULT_NEGATIVE_PROMPT[i : i + 20] for i in range(0, len(DEFAULT_NEGATIVE_PROMPT), 5)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 3), model_writer=buf, vocab_size=400, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=byte_fallback, hard_vocab_limit=False,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


# --- key maps and config -----------------------------------------------------------------------------


def test_every_official_t5_key_maps_to_a_umt5_xxl_parameter_of_the_same_shape_and_back():
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line.strip()]
    shapes = {
        name: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for name, shape, _ in rows
    }
    assert len(shapes) == 24 * 10 + 2
    for name in shapes:
        assert t5_key_hf_to_wan(t5_key_wan_to_hf(name)) == name
    wan = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert is_wan_t5(wan)
    hf = t5_wan_to_hf(wan)
    assert not is_wan_t5(hf)
    cfg = t5_config_from_state_dict(hf)
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (
        256384, 4096, 24, 64, 64, 10240,
    )  # fmt: skip
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and cfg.layer_norm_epsilon == 1e-6
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(params) - set(hf) == {"encoder.embed_tokens.weight"}  # tied alias of shared.weight
    assert set(hf) <= set(params)
    assert all(params[k] == tuple(v.shape) for k, v in hf.items())
    assert t5_hf_to_wan(hf).keys() == wan.keys()


def test_hf_to_wan_drops_tied_alias_and_spiece_and_unknown_names_raise():
    sd = t5_wan_to_hf(random_wan_t5(32, 8, 1, 2, 16))
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    sd["spiece_model"] = torch.tensor(list(b"abc"), dtype=torch.uint8)
    wan = t5_hf_to_wan(sd)
    assert "token_embedding.weight" in wan and "spiece_model" not in wan and len(wan) == len(sd) - 2
    assert spiece_model_bytes(sd) == b"abc" and spiece_model_bytes(wan) is None
    with pytest.raises(KeyError):
        t5_key_wan_to_hf("blocks.0.attn.q.bias")
    with pytest.raises(KeyError):
        t5_key_hf_to_wan("decoder.block.0.layer.0.SelfAttention.q.weight")


# --- numerics -----------------------------------------------------------------------------------------


def test_text_encoder_matches_independent_wan_reference_for_a_batch_of_different_lengths(encoder, wan_sd):
    out = encoder.encode(PROMPTS)
    ids, mask = encoder.tokenize(PROMPTS)
    ref = wan_t5_encode(wan_sd, ids, mask, HEADS)  # (B, 512, dim), the official math
    lengths = [encoder.count_tokens(p) for p in PROMPTS]
    assert lengths[0] < 16 < 128 < lengths[1] < 512  # long prompt exercises the log-spaced buckets
    for o, r, n in zip(out, ref, lengths):
        assert o.shape == (n, DIM)
        assert rel_err(o, r[:n]) < 1e-5


def test_trimmed_output_of_a_prompt_does_not_depend_on_its_batch_neighbour(encoder):
    alone = encoder.encode(PROMPTS[:1])[0]
    batched = encoder.encode(PROMPTS)[0]
    assert alone.shape == batched.shape
    assert rel_err(batched, alone) < 1e-6


def test_wan_pth_and_hf_safetensors_give_identical_embeddings(tmp_path, wan_sd, tokenizer):
    torch.save(wan_sd, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    save_file(t5_wan_to_hf(wan_sd), tmp_path / "umt5_xxl.safetensors")
    from_pth = torch.load(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    from_st = load_file(tmp_path / "umt5_xxl.safetensors")
    a = text_encoder_from_state_dict(from_pth, tokenizer, "cpu", torch.float32).encode(PROMPTS)
    b = text_encoder_from_state_dict(from_st, tokenizer, "cpu", torch.float32).encode(PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bf16_load_casts_weights_keeps_embedding_tied_and_moves_with_to(wan_sd, tokenizer):
    te = text_encoder_from_state_dict(wan_sd, tokenizer, "cpu", torch.bfloat16)
    assert te.dtype == torch.bfloat16 and te.device == torch.device("cpu")
    assert te.model.encoder.embed_tokens.weight is te.model.shared.weight
    assert not any(p.is_meta for p in te.model.parameters())
    out = te.encode(PROMPTS[:1])[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert te.to("cpu", torch.float32) is te and te.dtype == torch.float32
    assert te.model.encoder.embed_tokens.weight is te.model.shared.weight


def test_missing_unexpected_and_misshapen_weights_raise_value_error_naming_them(wan_sd, tokenizer):
    sd = dict(wan_sd)
    del sd["blocks.1.attn.k.weight"]
    sd["blocks.0.attn.q.bias"] = torch.zeros(DIM)
    with pytest.raises(
        ValueError,
        match=r"missing.*encoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight.*unexpected.*q\.bias",
    ):
        text_encoder_from_state_dict(sd, tokenizer, "cpu", torch.float32)
    sd = dict(wan_sd, **{"blocks.0.ffn.fc2.weight": torch.zeros(DIM, D_FF + 1)})
    with pytest.raises(ValueError, match=r"shapes.*wo\.weight"):
        text_encoder_from_state_dict(sd, tokenizer, "cpu", torch.float32)
    with pytest.raises(ValueError, match="not a umt5 encoder"):
        text_encoder_from_state_dict({"foo.weight": torch.zeros(1)}, tokenizer, "cpu", torch.float32)


def test_comfyui_file_with_spiece_and_scaled_fp8_weights_loads(wan_sd, tokenizer, encoder):
    hf = t5_wan_to_hf(wan_sd)
    hf["spiece_model"] = torch.frombuffer(bytearray(_train_spiece()), dtype=torch.uint8)
    te = text_encoder_from_state_dict(hf, tokenizer, "cpu", torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(te.encode(PROMPTS), encoder.encode(PROMPTS)))
    name = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
    scale = hf[name].abs().max() / 448.0
    hf[name] = (hf[name] / scale).to(torch.float8_e4m3fn)
    hf[name[: -len("weight")] + "scale_weight"] = scale.reshape(1)
    hf["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    te = text_encoder_from_state_dict(hf, tokenizer, "cpu", torch.float32)
    wi_1 = te.model.encoder.block[0].layer[1].DenseReluDense.wi_1.weight
    assert torch.equal(wi_1, hf[name].float() * scale)
    assert rel_err(wi_1, wan_sd["blocks.0.ffn.fc1.weight"]) < 0.1  # fp8 keeps the weight to a few percent


# --- prompts and tokenizers ---------------------------------------------------------------------------


def test_clean_prompt_unescapes_html_twice_fixes_mojibake_and_collapses_whitespace():
    assert clean_prompt("  Tom &amp;amp; Jerry  ") == "Tom & Jerry"
    assert clean_prompt("&lt;b&gt; caf\u00c3\u00a9") == "<b> café"
    assert clean_prompt("a\n\n b\t\tc   d ") == "a b c d"
    # ftfy folds full-width punctuation, as in the official pipeline
    assert clean_prompt(DEFAULT_NEGATIVE_PROMPT) == DEFAULT_NEGATIVE_PROMPT.replace("，", ",")


def test_tokenize_pads_to_512_with_pad_id_0_and_eos_right_after_the_real_tokens(encoder):
    ids, mask = encoder.tokenize(["a cat", "  a   cat  "])
    assert ids.shape == mask.shape == (2, 512)
    n = int(mask[0].sum())
    assert torch.equal(ids[0], ids[1])  # whitespace collapsed before tokenizing
    assert ids[0, n - 1] == 1 and (ids[0, :n - 1] != 1).all()  # fmt: skip
    assert (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all() and (mask[0, :n] == 1).all()
    assert n == encoder.count_tokens("a cat") == len(encoder.encode(["a cat"])[0])


def test_long_prompt_is_truncated_to_512_keeping_eos_and_count_tokens_reports_full_length(encoder):
    prompt = " ".join(["zebra"] * 400)
    assert encoder.count_tokens(prompt) > 512
    ids, mask = encoder.tokenize([prompt])
    assert mask.sum() == 512 and ids[0, -1] == 1
    assert encoder.encode([prompt])[0].shape == (512, DIM)


def test_tiny_tokenizer_builds_byte_identically_and_loads_from_folder_or_json(
    tmp_path, tiny_tok_dir, tokenizer
):
    build_tiny_tokenizer(tmp_path / "again", vocab_size=VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_tok_dir / name).read_bytes()
    assert len(tokenizer) == VOCAB
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    single = load_tokenizer(tiny_tok_dir / "tokenizer.json")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes((tiny_tok_dir / "tokenizer.json").read_bytes())
    nested = load_tokenizer(tmp_path)  # finds a tokenizer/ subfolder, as in diffusers layouts
    for tk in (single, nested):
        assert tk("a cat walks").input_ids == tokenizer("a cat walks").input_ids


def test_tiny_tokenizer_encodes_the_chinese_negative_prompt_and_emoji_without_unk(tokenizer):
    text = DEFAULT_NEGATIVE_PROMPT + " 😀 naïve Ωmega"
    ids = tokenizer(text).input_ids
    assert ids[-1] == 1 and tokenizer.unk_token_id not in ids and max(ids) < VOCAB
    assert tokenizer.decode(ids, skip_special_tokens=True) == unicodedata.normalize("NFKC", text)


def test_sentencepiece_model_bytes_and_spiece_folder_tokenize_like_sentencepiece(tmp_path):
    model = _train_spiece()
    sp = spm.SentencePieceProcessor(model_proto=model)
    (tmp_path / "spiece.model").write_bytes(model)
    texts = [
        "A cat walks on the grass.",
        DEFAULT_NEGATIVE_PROMPT,
        "Ünïcödé ﬁ ＡＢＣ １２３ 😀",
        "  spaced   out ",
    ]
    for tk in (
        load_tokenizer(spiece=model),
        load_tokenizer(tmp_path),
        load_tokenizer(tmp_path / "spiece.model"),
    ):
        assert (tk.pad_token_id, tk.eos_token_id) == (0, 1)
        for t in texts:
            assert tk(t).input_ids == [*sp.encode(t), 1]
    tk = load_tokenizer(spiece=_train_spiece(byte_fallback=False))
    assert tk.unk_token_id in tk("😀").input_ids


def test_load_tokenizer_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError):
        load_tokenizer()


def test_counting_tokens_on_other_threads_never_unpads_a_running_tokenize(encoder):
    """Validation (count_tokens, on the web server's threads) races the running request's tokenize: the fast
    tokenizer's padding/truncation state is shared, so without the encoder's lock a batch came out unpadded
    ("Unable to create tensor ... excessive nesting") — seen in the jobs-API fuzz under load."""
    import threading

    stop, errors = threading.Event(), []

    def count() -> None:
        while not stop.is_set():
            encoder.count_tokens("a fox " * 40)

    threads = [threading.Thread(target=count, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            try:
                ids, mask = encoder.tokenize(["a red fox", "a much longer prompt about a dog " * 5])
                assert ids.shape == mask.shape == (2, encoder.text_len)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
