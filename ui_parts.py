"""Pure helpers of the web page (ui.py): text, HTML and the layout sliders' rules. No Gradio events here.

Everything takes plain values (or the rank-0 `server` / `state` objects) and returns plain values, so the
rules are tested without a browser: which (ulysses, ring, cfg) the sliders may take, what the note next to
them says, what a history item restores into the form.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from engine.config import DEFAULT_NEGATIVE_PROMPT
from engine.request import RequestError
from engine.video import list_history
from parallel.layout import LayoutError, ParallelLayout
from parallel.serve import memory_report

HISTORY_LIMIT = 24
LORA_SLOTS = 4  # strength sliders on the page (a request takes at most engine.request.MAX_LORAS)
ONE_RANK_NOTE = "1 rank: restart with ./launch.sh --nproc N for more"
LAYOUT_FIELDS = ("ulysses_size", "ring_size", "cfg_size")
IMAGE_FIELDS = ("image", "last_frame")  # the request's image inputs, in /generate's order after the form's
IMAGE_LABELS = {"image": "First frame", "last_frame": "Last frame"}
IMAGE_NOTE = ("The video's shape follows the first frame's aspect ratio; Size gives its area. PNG, JPEG or WebP, "
              "at most {mb} MB and {side} pixels a side. Each upload serves one request and is deleted when it ends.")
TASK_WORDS = {0: "text-to-video", 1: "image-to-video", 2: "first-last-frame-to-video"}


# -- words --------------------------------------------------------------------------------------------------
def plural(n: int, word: str) -> str:
    """'1 rank', '2 ranks'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_value(v: Any) -> str:
    """A setting as a user reads it: true/false in lowercase, numbers without a trailing .0."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def fmt_seconds(s: float) -> str:
    """'4.2 s' or '3 min 07 s'."""
    return f"{s:.1f} s" if s < 90 else f"{int(s // 60)} min {int(s % 60):02d} s"


def progress_text(done: int, total: int, seconds: float) -> str:
    """'step 3/10 · 0.52 s/step · ETA 3.6 s' from the dispatcher's progress callback."""
    rate = seconds / max(done, 1)
    return f"step {done}/{total} · {rate:.2f} s/step · ETA {fmt_seconds(rate * (total - done))}"


def done_text(out) -> str:
    """The status line after a run: videos, times, seed (plain text)."""
    t = out.meta.get("timings", {})
    n = len(out.videos)
    parts = [f"Done: {plural(n, 'video')} in {fmt_seconds(t.get('total_s', 0))}",
             f"denoise {fmt_seconds(t.get('denoise_s', 0))} ({t.get('per_step_s', 0):.2f} s/step)",
             f"VAE decode {fmt_seconds(t.get('vae_decode_s', 0))}", f"seed {out.request.base_seed}"]
    mode = out.meta.get("memory_mode")
    if isinstance(mode, dict) and "blocks_to_swap" in mode:
        text = f"blocks_to_swap {mode['blocks_to_swap']}, offload_percent {fmt_value(mode.get('offload_percent', 0))}"
        if (mode.get("replan_s") or 0) > 0:
            text += f" (weights re-planned in {fmt_seconds(mode['replan_s'])})"
        parts.append(text)
    if image_text(out.meta):
        parts.append(image_text(out.meta))
    return " · ".join(parts)


# -- form inputs and refusals -------------------------------------------------------------------------------
def server_checked(component: gr.components.Component) -> None:
    """Skip Gradio's own range/choice check on this input: every value then reaches dispatcher.validate,
    whose refusal names the field and the allowed values (Gradio's says "Value 300 is greater than maximum
    value 241."). An instance attribute, not a subclass: Gradio writes a .pyi beside any module that
    subclasses a component."""
    component.preprocess = lambda payload: payload


def layout_field(exc: RequestError) -> RequestError:
    """A "layout" refusal renamed after the one size it is about (ulysses_size does not divide the heads,
    cfg_size is not 1 or 2, a size below 1); the product rule names all three and stays "layout"."""
    if exc.field != "layout":
        return exc
    text = str(exc).removeprefix("layout: ")
    for name in LAYOUT_FIELDS:
        if text.startswith((f"{name}=", f"{name} must")):
            return RequestError(name, text)
    return exc


def field_error(exc: RequestError) -> gr.Error:
    """A refusal shown to the user: 'field: message' (escaped: the modal renders HTML). `.plain` keeps the
    unescaped text for the status line."""
    err = gr.Error(html.escape(str(exc), quote=False), title=f"Invalid {exc.field}", print_exception=False)
    err.plain = str(exc)
    return err


def chosen_loras(names: list[str] | None, *strengths: float) -> list[dict] | None:
    """The page's LoRA picks as the request's `loras` ([{name, strength}]); None (the server's default) when unset."""
    if names is None:
        return None
    return [{"name": n, "strength": strengths[i] if i < len(strengths) else 1.0} for i, n in enumerate(names)]


def lora_slots(names: list[str] | None) -> list:
    """One visible, labelled strength slider per chosen LoRA; the rest hidden."""
    names = list(names or [])
    return [gr.update(visible=i < len(names), label=f"Strength of {names[i]}" if i < len(names) else "Strength")
            for i in range(LORA_SLOTS)]


def int_or_none(value: Any) -> int | None:
    """int(value) when it is a number (or a numeric string), else None."""
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


# -- image inputs ------------------------------------------------------------------------------------------
def image_inputs(image_count: int) -> list[gr.Image]:
    """The upload boxes of an image-to-video model (First frame; Last frame too for FLF2V) and the note on the
    output's shape; [] for a text-to-video model. Every value reaches the Controller as sent."""
    from engine.images import MAX_IMAGE_BYTES, MAX_IMAGE_SIDE
    from uploads import raw_file_input

    names = IMAGE_FIELDS[:image_count]
    if not names:
        return []
    with gr.Row(elem_id="images"):
        boxes = [gr.Image(type="filepath", sources=["upload", "clipboard"], label=IMAGE_LABELS[name], elem_id=name,
                          height=170, buttons=[], placeholder=f"{IMAGE_LABELS[name]}: drop an image or click")
                 for name in names]
    gr.Markdown(IMAGE_NOTE.format(mb=MAX_IMAGE_BYTES // 2**20, side=MAX_IMAGE_SIDE), elem_id="image-note")
    for name, box in zip(names, boxes):
        raw_file_input(box, name)
    return boxes


def shift_for_size(size: Any) -> float:
    """The official I2V 14B shift for a size: 3.0 at 832*480 / 480*832 (480p), 5.0 otherwise."""
    return 3.0 if str(size).replace(" ", "").replace("x", "*") in ("832*480", "480*832") else 5.0


def image_text(meta: dict) -> str:
    """The conditioning images of a sidecar in words: 'first frame 400*300 (sha256 1a2b3c4d…)'; '' for none."""
    parts = []
    for name, words in (("image", "first frame"), ("last_frame", "last frame")):
        info = meta.get(name)
        if isinstance(info, dict):
            parts.append(f"{words} {info.get('size', '?')} (sha256 {str(info.get('sha256', '?'))[:12]}…)")
    return ", ".join(parts)


# -- the layout sliders ---------------------------------------------------------------------------------------
def describe_layout(lay: ParallelLayout, world: int) -> str:
    """What runs, in words: the layout, the ranks, and whether context parallel is on (sp = ulysses × ring > 1)."""
    cp = "on" if lay.sp > 1 else "off"
    text = f"Runs {lay} on {plural(world, 'rank')} · context parallel {cp} (ulysses × ring = {lay.sp})"
    if lay.cfg > 1:
        text += " · the two CFG branches on separate ranks"
    if lay.replicas > 1:
        text += f" · {lay.replicas} replicas"
    return text


def check_layout_sizes(state, ulysses: Any, ring: Any, cfg: Any) -> tuple[ParallelLayout | None, str]:
    """(the layout, a one-line note) for the sliders' values; (None, the reason) when it cannot run here."""
    sizes = [int_or_none(v) for v in (ulysses, ring, cfg)]
    if any(s is None for s in sizes):
        return None, "The ulysses, ring and cfg sizes must be whole numbers."
    try:
        lay = state.layout_for(*sizes)
    except LayoutError as exc:
        return None, f"Not valid: {exc}"
    return lay, describe_layout(lay, state.rt.world_size)


def adjust_layout(state, moved: str, ulysses: Any, ring: Any, cfg: Any) -> tuple[int, int, int]:
    """The sizes after the user moved one slider (`moved`: "ulysses", "ring" or "cfg"): the others follow so
    that cfg × ring × ulysses = ranks where they can; a combination that no adjustment fixes (Ulysses that
    does not divide the heads, a size that does not divide the ranks) is returned as it is, to be flagged."""
    world, heads = state.rt.world_size, state.info.num_heads
    u, r, c = (int_or_none(v) or 1 for v in (ulysses, ring, cfg))
    if world % c:
        return u, r, c
    sp = world // c
    if moved == "ulysses" and sp % u == 0:
        return u, sp // u, c
    if moved == "ring" and sp % r == 0:
        return sp // r, r, c
    if moved == "cfg":
        if sp % u == 0 and heads % u == 0:
            return u, sp // u, c
        best = max(d for d in range(1, sp + 1) if sp % d == 0 and heads % d == 0)
        return best, sp // best, c
    return u, r, c


def memory_mode(server) -> dict[str, Any]:
    """The current memory plan (server.state.memory_mode once the engine re-plans per request; the start-up
    values until then)."""
    mode = getattr(server.state, "memory_mode", None)
    out = {"blocks_to_swap": server.cfg.blocks_to_swap, "offload_percent": server.cfg.offload_percent}
    if isinstance(mode, dict):
        out.update({k: v for k, v in mode.items() if v is not None})
    out["blocks_to_swap"] = min(int(out["blocks_to_swap"]), server.state.info.limits.num_blocks)
    return out


def restored_form(meta: dict, state) -> dict[str, Any]:
    """The form values of a history item's sidecar (request field → value); layout sizes only when they fit
    this gang, nothing for keys the sidecar lacks."""
    out: dict[str, Any] = {}
    for src, dst in (("prompt", "prompt"), ("size", "size"), ("frame_num", "frame_num"), ("steps", "sample_steps"),
                     ("guidance", "sample_guide_scale"), ("shift", "sample_shift"), ("solver", "sample_solver"),
                     ("batch_size", "batch_size"), ("teacache", "teacache")):
        if meta.get(src) is not None:
            out[dst] = meta[src]
    if "negative_prompt" in meta:
        neg = meta["negative_prompt"] or ""
        out["negative_prompt"] = "" if neg == DEFAULT_NEGATIVE_PROMPT else neg
    if int_or_none(meta.get("seed")) is not None:
        out["base_seed"] = int(meta["seed"]) - (int_or_none(meta.get("batch_index")) or 0)
    if isinstance(meta.get("sample_timesteps"), list):
        out["sample_timesteps"] = ",".join(f"{t:g}" for t in meta["sample_timesteps"])
    lay = meta.get("layout")
    if isinstance(lay, dict) and lay.get("world_size") == state.rt.world_size:
        sizes = tuple(lay.get(k) for k in LAYOUT_FIELDS)
        if check_layout_sizes(state, *sizes)[0] is not None:
            out.update(zip(LAYOUT_FIELDS, sizes))
    mode = meta.get("memory_mode")
    if isinstance(mode, dict):
        out.update({k: mode[k] for k in ("offload_percent", "blocks_to_swap") if mode.get(k) is not None})
    return out


def auto_preset(server) -> dict[str, Any]:
    """What `--preset auto` (presets/auto.py) picks for this gang, from the smallest GPU's total memory and
    the model's size (on the CPU everything fits); {} when there are no model files to size."""
    import math

    from engine.checkpoint import open_checkpoint
    from engine.loading import build_dit, open_dit
    from presets.auto import auto_settings

    totals = [float(m.get("total_gib") or 0) for m in (server.last_memory or [])]
    free = min(totals) if totals and min(totals) > 0 else 1e9  # the CPU: host memory, everything fits
    try:
        files = server.state.info.files
        _, dcfg = open_dit(files.dit)
        t5 = open_checkpoint(files.t5)
    except (AttributeError, OSError, ValueError):  # no model files to size (a stand-in server)
        return {}
    dit_gib = sum(p.numel() for p in build_dit(dcfg).parameters()) * 2 / 2**30
    t5_gib = sum(math.prod(t5.shape(k)) for k in t5 if k != "spiece_model") * 2 / 2**30
    return auto_settings(server.rt.world_size, free, dit_gib, t5_gib, dcfg.num_layers, dcfg.dim)


# -- panels ---------------------------------------------------------------------------------------------------
def memory_bars_html(memory: list[dict]) -> str:
    """One bar per rank: in use and peak of the last request, against the device's total (or the peak)."""
    if not memory:
        return "<p>No memory report yet.</p>"
    scale = max([m.get("total_gib") or 0 for m in memory] + [m.get("peak_gib") or 0 for m in memory] + [1e-9])
    rows = []
    for m in memory:
        used, peak, total = (float(m.get(k) or 0) for k in ("in_use_gib", "peak_gib", "total_gib"))
        of = f" of {total:.1f} GiB" if total else " (host RAM, max RSS)"
        rows.append(
            f'<div class="wan-mem" data-rank="{int(m.get("rank", 0))}">'
            f'<div class="wan-mem-label">rank {int(m.get("rank", 0))} · {html.escape(str(m.get("device", "?")))}</div>'
            f'<div class="wan-mem-track"><div class="wan-mem-peak" style="width:{100 * peak / scale:.1f}%"></div>'
            f'<div class="wan-mem-used" style="width:{100 * used / scale:.1f}%"></div></div>'
            f'<div class="wan-mem-text">in use {used:.2f} GiB · peak {peak:.2f} GiB{of}</div></div>'
        )
    return "".join(rows)


def start_up_facts(server) -> list[tuple[str, str, str]]:
    """The settings fixed at start-up, as (name, value, how to change it): plain text for the cluster panel."""
    st, cfg, info = server.state, server.cfg, server.state.info
    lay = st.default_layout
    mode = memory_mode(server)
    return [
        ("world size", f"{plural(st.rt.world_size, 'rank')} on {plural(max(1, st.rt.nnodes), 'node')}",
         "one rank per GPU: ./launch.sh --nproc N"),
        ("model", f"{info.key} · {info.num_layers} layers · {info.num_heads} heads · "
                  f"{str(info.dtype).replace('torch.', '')}", "--model_dir / --ckpt_dir"),
        ("default layout", str(lay), "per request: the sliders; default: --ulysses_size / --ring_size"),
        ("context parallel (default layout)", f"{'on' if st.use_context_parallel and lay.sp > 1 else 'off'} (ulysses × ring = {lay.sp})",
         "on when a request's ulysses × ring > 1"),
        ("FSDP", f"DiT {fmt_value(st.dit_fsdp)} · T5 {fmt_value(st.t5_fsdp)}",
         "--use_fsdp (or --dit_fsdp / --t5_fsdp) or a preset; needs 2+ ranks"),
        ("attention kernel", f"{st.kernel.name} (asked: {cfg.attention})", "--attention"),
        ("memory mode now", f"blocks_to_swap {mode['blocks_to_swap']} · offload_percent {fmt_value(mode['offload_percent'])}",
         "per request: the offload and swap sliders"),
        ("torch.compile", fmt_value(cfg.compile), "--compile or a preset (max_speed)"),
    ]


def cluster_html(server) -> str:
    """The cluster panel: start-up facts (plain text), memory per rank, start-up log."""
    st = server.state
    memory = server.last_memory
    note = "peak of the last request, every rank"
    if not memory:
        memory = [memory_report(server.rt)]
        note = "rank 0 now"
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td><td class='wan-how'>{html.escape(how)}</td></tr>"
                   for k, v, how in start_up_facts(server))
    logs = html.escape("\n".join(st.startup_log)) or "(none)"
    return (
        f'<div class="wan-cluster"><table>{rows}</table>'
        f"<h4>Memory per rank <small>({note})</small></h4>{memory_bars_html(memory)}"
        f"<h4>Start-up log</h4><pre>{logs}</pre></div>"
    )


def history_items(outputs_dir: str | Path, items: list[dict] | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """(gallery items, their video paths) of the newest generations: `items` (the job store's, in list_history's
    shape) or those in outputs_dir."""
    items = (list_history(outputs_dir) if items is None else items)[:HISTORY_LIMIT]
    gallery = []
    for it in items:
        m = it["meta"]
        caption = f"{str(m.get('prompt', ''))[:40]} · seed {m.get('seed', '?')} · {m.get('size', '?')} · {m.get('frame_num', '?')} frames"
        if isinstance(m.get("image"), dict):
            caption += f" · from a {m['image'].get('size', '?')} image"
        gallery.append((it["video"], caption))
    return gallery, [it["video"] for it in items]


def waiting_in_queue(demo: gr.Blocks, session: str) -> bool:
    """Whether this session has an event waiting (not yet started) in Gradio's queue."""
    queues = getattr(getattr(demo, "_queue", None), "event_queue_per_concurrency_id", None) or {}
    try:
        return any(e.session_hash == session for q in list(queues.values()) for e in list(q.queue))
    except (AttributeError, RuntimeError):  # another Gradio version, or the queue changed under us
        return False
