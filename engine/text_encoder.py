"""umt5-xxl text encoder: Wan ↔ HF key maps, prompt cleaning, tokenizers and the batched encoder."""

from __future__ import annotations

import html
import itertools
import json
import re
import string
import threading
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

TEXT_LEN = 512
SPIECE_KEY = "spiece_model"  # ComfyUI files may carry the sentencepiece model as a uint8 tensor
_TIED_KEY = "encoder.embed_tokens.weight"  # HF alias of shared.weight

# ---------------------------------------------------------------------------------------------------
# 1. Key maps (Wan names as in the official .pth ↔ HF UMT5EncoderModel names)

_BLOCK_MAP = {  # Wan suffix under blocks.N → HF suffix under encoder.block.N
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_MAP_INV = {v: k for k, v in _BLOCK_MAP.items()}
_TOP_MAP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_TOP_MAP_INV = {v: k for k, v in _TOP_MAP.items()} | {_TIED_KEY: "token_embedding.weight"}
_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def t5_key_wan_to_hf(name: str) -> str:
    """HF UMT5 name of one Wan T5 tensor name; KeyError if it is not a T5 encoder name."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _WAN_BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_MAP:
        return f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
    raise KeyError(f"not a Wan T5 encoder tensor name: {name!r}")


def t5_key_hf_to_wan(name: str) -> str:
    """Wan name of one HF UMT5 encoder tensor name; KeyError if it is not a T5 encoder name."""
    if name in _TOP_MAP_INV:
        return _TOP_MAP_INV[name]
    m = _HF_BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_MAP_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_MAP_INV[m.group(2)]}"
    raise KeyError(f"not a HF UMT5 encoder tensor name: {name!r}")


def _rename(sd: Mapping[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        try:
            out[fn(k)] = v
        except KeyError:
            out[k] = v  # unknown names pass through; the loader reports them as unexpected
    return out


def t5_wan_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan-layout T5 state dict to HF UMT5EncoderModel names (unknown keys kept as they are)."""
    return _rename(sd, t5_key_wan_to_hf)


def t5_hf_to_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a HF UMT5 encoder state dict to Wan names; drops the tied embed_tokens alias and spiece_model."""
    sd = {k: v for k, v in sd.items() if k != SPIECE_KEY and not (k == _TIED_KEY and "shared.weight" in sd)}
    return _rename(sd, t5_key_hf_to_wan)


def is_wan_t5(sd: Mapping[str, object]) -> bool:
    """True if the state dict uses the official Wan T5 names (token_embedding, blocks.N.*)."""
    return "token_embedding.weight" in sd or any(k.startswith("blocks.") for k in sd)


def spiece_model_bytes(sd: Mapping[str, torch.Tensor]) -> bytes | None:
    """The sentencepiece model stored in a ComfyUI text-encoder file, or None."""
    t = sd.get(SPIECE_KEY)
    if t is None:
        return None
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _to_hf_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named weights without spiece_model / fp8 scale bookkeeping and without the tied alias."""
    sd = t5_wan_to_hf(sd) if is_wan_t5(sd) else dict(sd)
    sd.pop(SPIECE_KEY, None)
    if _TIED_KEY in sd:
        alias = sd.pop(_TIED_KEY)
        sd.setdefault("shared.weight", alias)
    return sd


# ---------------------------------------------------------------------------------------------------
# 2. Config


def t5_config_from_state_dict(hf_sd: Mapping[str, torch.Tensor]) -> UMT5Config:
    """The UMT5Config (umt5-xxl math: gated GELU-tanh, 32 buckets, max distance 128) that fits these weights."""
    emb = hf_sd.get("shared.weight", hf_sd.get(_TIED_KEY))
    rel = hf_sd.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = hf_sd.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    wi0 = hf_sd.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    if emb is None or rel is None or q is None or wi0 is None:
        raise ValueError(
            "not a umt5 encoder state dict: need shared, block 0 attention, relative bias and wi_0"
        )
    layers = {int(m.group(1)) for k in hf_sd if (m := _HF_BLOCK.fullmatch(k))}
    num_buckets, num_heads = rel.shape  # (32, heads)
    if q.shape[0] % num_heads:
        raise ValueError(f"attention width {q.shape[0]} is not a multiple of {num_heads} heads")
    return UMT5Config(
        vocab_size=emb.shape[0],
        d_model=emb.shape[1],
        d_kv=q.shape[0] // num_heads,
        d_ff=wi0.shape[0],
        num_layers=max(layers) + 1,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",  # sets dense_act_fn = gelu_new (tanh approximation)
        is_encoder_decoder=False,
        use_cache=False,
    )


# ---------------------------------------------------------------------------------------------------
# 3. Prompt cleaning and tokenizers


def clean_prompt(text: str) -> str:
    """Official Wan prompt cleaning: ftfy, html-unescape twice, strip, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _wrap(tok: Tokenizer, specials: Mapping[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a tokenizers pipeline, with T5 special tokens."""
    names = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"} | dict(specials or {})
    for key, piece in names.items():
        if tok.token_to_id(piece) is None:
            raise ValueError(f"tokenizer has no {key} {piece!r}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=int(1e30), **names)


def _read_specials(folder: Path) -> dict[str, str]:
    """pad/eos/unk token strings declared by special_tokens_map.json or tokenizer_config.json."""
    out: dict[str, str] = {}
    for f in (folder / "tokenizer_config.json", folder / "special_tokens_map.json"):
        cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        for key in ("pad_token", "eos_token", "unk_token"):
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                out[key] = v
    return out


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message (wire types 0, 1, 2, 5)."""
    i = 0

    def varint() -> int:
        nonlocal i
        shift = out = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
            continue
        if wire not in (1, 2, 5):
            raise ValueError(f"unsupported protobuf wire type {wire}")
        n = varint() if wire == 2 else (8 if wire == 1 else 4)
        yield field, buf[i : i + n]
        i += n


def _spm_tokenizer(model: bytes) -> Tokenizer:
    """Convert a sentencepiece Unigram model (the umt5 spiece.model) to a tokenizers pipeline."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)]
    byte_fallback = any(sp.is_byte(i) for i in range(n))
    charsmap, dummy_prefix = b"", True
    for field, value in _proto_fields(model):
        if field == 3:  # ModelProto.normalizer_spec
            for f, v in _proto_fields(value):
                if f == 2:
                    charsmap = bytes(v)
                elif f == 3:
                    dummy_prefix = bool(v)
    tok = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=byte_fallback))
    norms = [normalizers.Precompiled(charsmap)] if charsmap else []
    tok.normalizer = normalizers.Sequence(
        [*norms, normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    )
    scheme = "always" if dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return tok


def load_tokenizer(path: str | Path | None = None, spiece: bytes | None = None) -> PreTrainedTokenizerFast:
    """Local umt5-style tokenizer from a folder, a tokenizer.json / spiece.model file, or spiece bytes."""
    if path is None:
        if spiece is None:
            raise ValueError("load_tokenizer needs a path or sentencepiece model bytes")
        return _wrap(_spm_tokenizer(spiece))
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return _wrap(Tokenizer.from_file(str(path)), _read_specials(path.parent))
        return _wrap(_spm_tokenizer(path.read_bytes()), _read_specials(path.parent))
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    for folder in (path, path / "tokenizer", path / "google" / "umt5-xxl"):
        if (folder / "tokenizer.json").is_file():
            return _wrap(Tokenizer.from_file(str(folder / "tokenizer.json")), _read_specials(folder))
        if (folder / "spiece.model").is_file():
            return _wrap(_spm_tokenizer((folder / "spiece.model").read_bytes()), _read_specials(folder))
    if spiece is not None:
        return _wrap(_spm_tokenizer(spiece))
    raise FileNotFoundError(f"no tokenizer.json or spiece.model in {path}")


_TINY_WORDS = """
a an the and or of in on at to from with by for over under into through across around near is are was were
man woman men women boy girl child people baby old young face eyes hair hand hands dog cat bird horse fish
tree trees flower flowers grass forest mountain river lake sea ocean beach wave waves sky cloud clouds sun
moon star rain snow fog wind fire water light city street road car train boat ship plane house room window
walk walks walking run runs running jump jumping fly flying swim swimming dance dancing sit sitting stand
red blue green yellow white black orange purple pink brown gray golden silver dark bright colorful big small
large tiny tall short long wide slow fast gentle soft warm cold beautiful camera shot view close up angle
aerial drone motion cinematic realistic photo video scene background detailed high quality lighting sunset
night day morning evening style art painting anime cartoon film frame static blurry worst low jpeg ugly
"""


def _tiny_pieces(vocab_size: int) -> list[str]:
    """Deterministic piece list: T5 specials, 256 byte tokens, chars, words, then letter n-grams."""
    from engine.config import DEFAULT_NEGATIVE_PROMPT

    cjk = "".join(
        dict.fromkeys(c for c in unicodedata.normalize("NFKC", DEFAULT_NEGATIVE_PROMPT) if ord(c) > 127)
    )
    head = ["<pad>", "</s>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
    chars = [c for c in string.printable if not c.isspace()] + list(cjk)
    words = [f"▁{w}" for w in dict.fromkeys(_TINY_WORDS.split())]

    def ngrams() -> Iterator[str]:
        for n in itertools.count(2):
            for t in itertools.product(string.ascii_lowercase, repeat=n):
                yield "▁" + "".join(t)
                yield "".join(t)

    pieces = list(dict.fromkeys(head + chars + words))
    if vocab_size < len(pieces):
        raise ValueError(f"tiny tokenizer needs vocab_size >= {len(pieces)}")
    seen = set(pieces)
    pieces += itertools.islice((p for p in ngrams() if p not in seen), vocab_size - len(pieces))
    return pieces


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 2048) -> None:
    """Write a deterministic T5-convention Unigram tokenizer (byte fallback) for the tiny demo model."""
    pieces = _tiny_pieces(vocab_size)
    vocab = [
        (p, 0.0 if i < 3 else (-20.0 if p.startswith("<0x") else -10.0 - i * 1e-4))
        for i, p in enumerate(pieces)
    ]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": TEXT_LEN, **specials}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# 4. Encoder


class TextEncoder:
    """umt5 encoder + tokenizer: prompts → per-prompt (L_i, d_model) embeddings trimmed to their tokens."""

    text_len = TEXT_LEN

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerFast) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # A fast tokenizer sets padding/truncation on its one Rust tokenizer before each call, so a count_tokens
        # (request validation, on the web server's threads) racing a tokenize (the running request) could make
        # the batch unpadded ("Unable to create tensor ... excessive nesting"): one call at a time.
        self._tokenizer_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        """Device of the encoder weights."""
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the encoder weights."""
        return self.model.shared.weight.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the encoder weights (in place); returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, EOS-terminated ids and mask, padded/truncated to text_len: two (B, text_len) int64 tensors."""
        cleaned = [clean_prompt(p) for p in prompts]
        with self._tokenizer_lock:
            enc = self.tokenizer(
                cleaned,
                padding="max_length",
                max_length=self.text_len,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
        return enc["input_ids"], enc["attention_mask"]

    def count_tokens(self, prompt: str) -> int:
        """Real token count (EOS included) of the cleaned prompt before truncation (thread-safe)."""
        cleaned = clean_prompt(prompt)
        with self._tokenizer_lock:
            return len(self.tokenizer(cleaned, add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Embeddings of each prompt, trimmed to its real token count: list of (L_i, d_model)."""
        if not prompts:
            return []
        ids, mask = self.tokenize(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, text_len, d_model)
        return [u[:n] for u, n in zip(out, mask.sum(dim=1).tolist())]


def text_encoder_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerFast,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
) -> TextEncoder:
    """Build the encoder on the meta device and assign weights (Wan or HF names, auto-detected)."""
    names = _to_hf_names(sd)
    # ComfyUI scaled-fp8 files: weight · scale_weight; the other bookkeeping tensors are not weights
    scales = {
        k[: -len("scale_weight")] + "weight": names.pop(k) for k in list(names) if k.endswith(".scale_weight")
    }
    for k in [k for k in names if k == "scaled_fp8" or k.endswith(".scale_input")]:
        del names[k]
    config = t5_config_from_state_dict(names)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != _TIED_KEY}
    missing, unexpected = sorted(want.keys() - names.keys()), sorted(names.keys() - want.keys())
    if missing or unexpected:
        raise ValueError(
            f"T5 weights do not fit {config.num_layers}-layer umt5: missing {missing[:4]} ({len(missing)}), "
            f"unexpected {unexpected[:4]} ({len(unexpected)})"
        )
    bad = [f"{k} {tuple(names[k].shape)} != {s}" for k, s in want.items() if tuple(names[k].shape) != s]
    if bad:
        raise ValueError(f"T5 weight shapes do not fit: {bad[:4]}")
    for k, v in names.items():  # one converted tensor at a time; it goes straight into the model
        if k in scales:
            v = v.to(device=device, dtype=torch.float32) * scales[k].to(device=device, dtype=torch.float32)
        names[k] = v.to(device=device, dtype=dtype)
    model.load_state_dict(names, strict=False, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: one tensor, as in HF
    return TextEncoder(model, tokenizer)
