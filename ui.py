"""The Gradio web UI, hosted by rank 0. Imported only there (workers never import gradio).

It talks to the gang only through `server.dispatcher` (validate / submit / cancel / info) and reads
`server.state`, `server.cfg` and `server.last_memory` for the cluster panel. Every value a browser or an
API client sends is checked by `dispatcher.validate`; a refusal is a `gr.Error` naming the field.
"""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from engine.cli import ATTENTION_BACKENDS, RunConfig
from engine.lora import STRENGTH_RANGE, list_loras
from engine.pipeline import Cancelled
from engine.request import MAX_BATCH, MAX_FRAMES, MAX_PROMPT_CHARS, MAX_STEPS, RequestError, parse_timesteps
from engine.tiny import RANDOM_WEIGHTS_NOTICE
from engine.video import list_history, read_sidecar
from parallel.faults import ServerRestarting
from parallel.layout import LayoutError, valid_layouts
from parallel.serve import RankFailed, memory_report
from presets import available_presets, load_preset

log = logging.getLogger("wan.ui")

HISTORY_LIMIT = 24
NO_PRESET = "(start-up settings)"
# Settings a request can change; everything else in a preset applies at start-up only.
REQUEST_KEYS = ("negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale", "sample_shift",
                "sample_solver", "base_seed", "batch_size", "teacache", "sample_timesteps")
LAYOUT_KEYS = ("ulysses_size", "ring_size", "cfg_size")
LORA_SLOTS = 4  # strength sliders on the page (a request takes at most engine.request.MAX_LORAS)


# -- form inputs that leave every check to dispatcher.validate ----------------------------------------------
def server_checked(component: gr.components.Component) -> None:
    """Skip Gradio's own range/choice check on this input: every value then reaches dispatcher.validate,
    whose refusal names the field and the allowed values (Gradio's says "Value 300 is greater than maximum
    value 241."). An instance attribute, not a subclass: Gradio writes a .pyi beside any module that
    subclasses a component."""
    component.preprocess = lambda payload: payload


# -- pure helpers ---------------------------------------------------------------------------------------------
def field_error(exc: RequestError) -> gr.Error:
    """A refusal shown to the user: 'field: message' (escaped: the modal renders HTML)."""
    return gr.Error(html.escape(str(exc), quote=False), title=f"Invalid {exc.field}", print_exception=False)


def layout_options(state) -> dict[str, tuple[int, int, int]]:
    """Every layout this gang can run, as label → (ulysses, ring, cfg); the label is what really runs."""
    world, heads = state.rt.world_size, state.info.num_heads
    ordered = sorted(valid_layouts(world, heads), key=lambda lay: (lay.cfg, -lay.ulysses))  # Ulysses first
    candidates = [(lay.ulysses, lay.ring, lay.cfg) for lay in ordered]
    candidates += [(1, 1, 1), (1, 1, 2)]  # replicas when context parallel is off
    out: dict[str, tuple[int, int, int]] = {}
    for u, r, c in candidates:
        try:
            lay = state.layout_for(u, r, c)
        except LayoutError:
            continue
        out.setdefault(str(lay), (lay.ulysses, lay.ring, lay.cfg))
    return out


def parse_layout(value: Any, options: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    """A layout label of the dropdown → (ulysses, ring, cfg); RequestError("layout") for anything else."""
    if not isinstance(value, str) or value not in options:
        raise RequestError("layout", f"must be one of: {'; '.join(options)}; got {str(value)[:60]!r}")
    return options[value]


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


def _int_or_none(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{int(s // 60)} min {int(s % 60):02d} s"


def progress_text(done: int, total: int, seconds: float) -> str:
    """'step 3/10 · 0.52 s/step · ETA 3.6 s' from the dispatcher's progress callback."""
    rate = seconds / max(done, 1)
    return f"step {done}/{total} · {rate:.2f} s/step · ETA {fmt_seconds(rate * (total - done))}"


def status_html(kind: str, text: str, fraction: float | None = None) -> str:
    bar = ""
    if fraction is not None:
        bar = f'<div class="wan-bar"><div style="width:{100 * min(max(fraction, 0), 1):.1f}%"></div></div>'
    return f'<div class="wan-status wan-{kind}" data-state="{kind}">{bar}<span>{html.escape(text)}</span></div>'


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


def cluster_html(server) -> str:
    """The cluster panel: ranks, layout, sharding, memory per rank, start-up log."""
    st, cfg, info = server.state, server.cfg, server.state.info
    memory = server.last_memory
    note = "peak of the last request, every rank"
    if not memory:
        memory = [memory_report(server.rt)]
        note = "rank 0 now"
    facts = [
        ("world size", f"{st.rt.world_size} rank(s) on {max(1, st.rt.nnodes)} node(s)"),
        ("model", f"{info.key} · {info.num_layers} layers · {info.num_heads} heads · {str(info.dtype).replace('torch.', '')}"),
        ("default layout", str(st.default_layout)),
        ("context parallel", str(st.use_context_parallel and st.default_layout.sp > 1).lower()),
        ("FSDP", f"DiT {str(st.dit_fsdp).lower()} · T5 {str(st.t5_fsdp).lower()}"),
        ("attention kernel", st.kernel.name),
        ("offload / block swap", f"offload_percent {cfg.offload_percent} · blocks_to_swap {cfg.blocks_to_swap}"),
        ("torch.compile", str(cfg.compile).lower()),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    logs = html.escape("\n".join(st.startup_log)) or "(none)"
    return (
        f'<div class="wan-cluster"><table>{rows}</table>'
        f"<h4>Memory per rank <small>({note})</small></h4>{memory_bars_html(memory)}"
        f"<h4>Start-up log</h4><pre>{logs}</pre></div>"
    )


def history_items(outputs_dir: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(gallery items, their video paths) of the newest generations in outputs_dir."""
    items = list_history(outputs_dir)[:HISTORY_LIMIT]
    gallery = []
    for it in items:
        m = it["meta"]
        caption = f"{str(m.get('prompt', ''))[:40]} · seed {m.get('seed', '?')} · {m.get('size', '?')} · {m.get('frame_num', '?')} frames"
        gallery.append((it["video"], caption))
    return gallery, [it["video"] for it in items]


def done_text(out) -> str:
    t = out.meta.get("timings", {})
    n = len(out.videos)
    parts = [f"Done: {n} video{'s' if n != 1 else ''} in {fmt_seconds(t.get('total_s', 0))}",
             f"denoise {fmt_seconds(t.get('denoise_s', 0))} ({t.get('per_step_s', 0):.2f} s/step)",
             f"VAE decode {fmt_seconds(t.get('vae_decode_s', 0))}", f"seed {out.request.base_seed}"]
    return " · ".join(parts)


def start_up_rows(server) -> list[tuple[str, Any, str]]:
    """The settings fixed at start-up: (label, value, how to change it)."""
    st, cfg = server.state, server.cfg
    return [
        ("World size (ranks)", st.rt.world_size, "one rank per GPU: restart with ./launch.sh --nproc N"),
        ("FSDP (DiT / T5)", f"{str(st.dit_fsdp).lower()} / {str(st.t5_fsdp).lower()}",
         "restart with --use_fsdp (or --dit_fsdp / --t5_fsdp) or a preset; needs 2+ ranks"),
        ("Context parallel", str(st.use_context_parallel).lower(), "preset key use_context_parallel"),
        ("offload_percent", cfg.offload_percent, "restart with --offload_percent 0.5 or a preset (e.g. low_vram)"),
        ("blocks_to_swap", cfg.blocks_to_swap, "restart with --blocks_to_swap N or a preset"),
        ("Attention backend", f"{st.kernel.name} (asked: {cfg.attention})",
         f"restart with --attention {'|'.join(ATTENTION_BACKENDS)}"),
        ("torch.compile", str(cfg.compile).lower(), "restart with --compile or a preset (max_speed)"),
    ]


def waiting_in_queue(demo: gr.Blocks, session: str) -> bool:
    """Whether this session has an event waiting (not yet started) in Gradio's queue."""
    queues = getattr(getattr(demo, "_queue", None), "event_queue_per_concurrency_id", None) or {}
    try:
        return any(e.session_hash == session for q in list(queues.values()) for e in list(q.queue))
    except (AttributeError, RuntimeError):  # another Gradio version, or the queue changed under us
        return False


# -- the job runner -----------------------------------------------------------------------------------------
@dataclass
class Job:
    """One generation of one browser session (or API client), run on a thread; events flow to the page."""

    session: str
    raw: dict
    events: queue.Queue = field(default_factory=queue.Queue)
    cancel_requested: bool = False
    steps_done: int = 0


class Controller:
    """The UI's handlers; holds the running job so that Cancel stops only its owner's request."""

    def __init__(self, server, cfg: RunConfig) -> None:
        self.server, self.cfg = server, cfg
        self.dispatcher = server.dispatcher
        self.info = self.dispatcher.info
        self.layouts = layout_options(server.state)
        self.default_layout = str(server.state.default_layout)
        if self.default_layout not in self.layouts:
            self.layouts[self.default_layout] = (server.state.default_layout.ulysses, server.state.default_layout.ring,
                                                 server.state.default_layout.cfg)
        self._lock = threading.Lock()
        self.job: Job | None = None
        self._cancel_queued: set[str] = set()
        self.is_waiting: Callable[[str], bool] = lambda session: False  # set by build_ui: in Gradio's queue?

    # -- request ------------------------------------------------------------------------------------------
    def raw_request(self, prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale, sample_shift,
                    base_seed, sample_solver, batch_size, layout, teacache, loras=None, sample_timesteps=None) -> dict:
        """The form's values as a raw request, checked by dispatcher.validate (gr.Error naming the field).
        Explicit timesteps apply while Steps equals their count (the Steps control wins otherwise)."""
        try:
            timesteps = parse_timesteps(sample_timesteps) or None
            if timesteps and sample_steps is not None and _int_or_none(sample_steps) != len(timesteps):
                timesteps = None
            u, r, c = parse_layout(layout if layout is not None else self.default_layout, self.layouts)
            raw = {"prompt": prompt, "negative_prompt": negative_prompt, "size": size, "frame_num": frame_num,
                   "sample_steps": sample_steps, "sample_guide_scale": sample_guide_scale, "sample_shift": sample_shift,
                   "sample_solver": sample_solver, "base_seed": base_seed, "batch_size": batch_size,
                   "teacache": teacache, "ulysses_size": u, "ring_size": r, "cfg_size": c, "loras": loras,
                   "sample_timesteps": timesteps}
            raw["sample_steps"] = self.dispatcher.validate(raw).sample_steps  # null → the default, for the progress bar
        except RequestError as exc:
            raise field_error(exc) from None
        return raw

    def generate(self, prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale, sample_shift,
                 base_seed, sample_solver, batch_size, layout, teacache, request: gr.Request, loras=None,
                 sample_timesteps=None, progress=gr.Progress()):  # noqa: B008 - Gradio's way to ask for a progress tracker
        """Generate video(s) from a text prompt; returns the mp4 first, then files, seed used, metadata, status."""
        raw = self.raw_request(prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale,
                               sample_shift, base_seed, sample_solver, batch_size, layout, teacache, loras,
                               sample_timesteps)
        session = getattr(request, "session_hash", None) or "anonymous"
        skip = gr.skip()
        with self._lock:
            if session in self._cancel_queued:
                self._cancel_queued.discard(session)
                yield skip, skip, skip, skip, status_html("cancelled", "Cancelled before it started.")
                return
            job = self.job = Job(session, raw)
        total = raw["sample_steps"]
        thread = threading.Thread(target=self._run, args=(job,), name="wan-generate", daemon=True)
        thread.start()
        progress((0, total), desc="encoding the prompt", unit="step")
        yield skip, skip, skip, skip, status_html("running", "Encoding the prompt…", 0.0)
        try:
            while True:
                try:
                    kind, payload = job.events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if kind == "step":
                    done, total, secs = payload
                    job.steps_done = done
                    text = progress_text(done, total, secs)
                    if done >= total:
                        text = f"{done}/{total} steps in {fmt_seconds(secs)} · decoding the video…"
                    progress((done, total), desc=text, unit="step")
                    yield skip, skip, skip, skip, status_html("running", text, done / max(total, 1))
                elif kind == "done":
                    out = payload
                    files = [str(p) for p in out.videos] + [str(p) for p in out.sidecars]
                    yield (str(out.videos[0]), files, str(out.request.base_seed), out.meta,
                           status_html("done", done_text(out), 1.0))
                    return
                elif kind == "cancelled":
                    at = re.search(r"step (\d+)", payload)
                    text = f"Cancelled at step {at.group(1) if at else job.steps_done} of {total}."
                    yield skip, skip, skip, skip, status_html("cancelled", text)
                    return
                elif kind == "invalid":
                    raise field_error(payload)
                else:
                    raise gr.Error(html.escape(payload, quote=False), title="Generation failed", print_exception=False)
        finally:
            if thread.is_alive():  # the page went away mid-run: stop the gang at the next step
                job.cancel_requested = True
                self.dispatcher.cancel()
            with self._lock:
                if self.job is job:
                    self.job = None

    def _run(self, job: Job) -> None:
        def on_step(done: int, total: int, seconds: float) -> None:
            if job.cancel_requested:
                self.dispatcher.cancel()  # a cancel that came before the gang was busy
            job.events.put(("step", (done, total, seconds)))

        try:
            job.events.put(("done", self.dispatcher.submit(job.raw, progress=on_step)))
        except Cancelled as exc:
            job.events.put(("cancelled", str(exc)))
        except RequestError as exc:
            job.events.put(("invalid", exc))
        except (RankFailed, ServerRestarting) as exc:
            log.error("request failed: %s", exc)
            job.events.put(("error", str(exc)))
        except Exception as exc:  # noqa: BLE001 - logged here with its traceback; the page gets one line
            log.exception("request failed")
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            job.events.put(("error", f"{type(exc).__name__}: {first}"))

    def cancel(self, request: gr.Request) -> None:
        """Stop this session's running request at the next step (or drop it when its turn comes)."""
        session = getattr(request, "session_hash", None) or "anonymous"
        with self._lock:
            job = self.job
            if job is not None and job.session == session:
                job.cancel_requested = True
                self.dispatcher.cancel()
                gr.Info("Cancelling at the next step…")
            elif self.is_waiting(session):
                self._cancel_queued.add(session)
                gr.Info("Your request is waiting in the queue: it will be dropped when its turn comes.")
            else:
                gr.Info("Nothing of yours is running or waiting.")

    # -- panels -------------------------------------------------------------------------------------------
    def panels(self):
        gallery, paths = history_items(self.cfg.outputs_dir)
        return gallery, paths, cluster_html(self.server)

    def show_history(self, paths: list[str], evt: gr.SelectData):
        if evt is None or not paths or not 0 <= evt.index < len(paths):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        video = paths[evt.index]
        try:
            meta = read_sidecar(video)
        except (OSError, ValueError):
            meta = {}
        return video, [video], str(meta.get("seed", "")), meta

    def apply_preset(self, name: str | None):
        """The preset's request settings into the form; its start-up settings explained in a note."""
        keys = (*REQUEST_KEYS, "layout")
        defaults = {**self.info.defaults, "layout": self.default_layout}
        if not name or name == NO_PRESET:
            return (*[defaults.get(k) for k in keys], "Form reset to this server's start-up settings.")
        try:
            preset = load_preset(name)
        except (FileNotFoundError, ValueError) as exc:
            raise gr.Error(html.escape(f"preset: {exc}", quote=False), print_exception=False) from None
        values: dict[str, Any] = {k: preset[k] for k in REQUEST_KEYS if k in preset}
        if isinstance(values.get("sample_timesteps"), (list, tuple)):
            values["sample_timesteps"] = ",".join(f"{t:g}" for t in values["sample_timesteps"])
        notes = []
        if any(k in preset for k in LAYOUT_KEYS):
            st = self.server.state
            try:
                lay = st.layout_for(preset.get("ulysses_size"), preset.get("ring_size"), preset.get("cfg_size"))
                values["layout"] = str(lay)
            except LayoutError as exc:
                notes.append(f"Its layout does not fit this gang, kept the current one: {exc}")
        world = preset.get("world_size")
        restart = f"./launch.sh --preset {name}"
        if world and world != self.server.rt.world_size:
            restart = f"./launch.sh --nproc {world} --preset {name}"
            notes.append(f"It is made for {world} ranks; this server runs {self.server.rt.world_size}.")
        start_up = {k: v for k, v in preset.items() if k not in REQUEST_KEYS and k not in LAYOUT_KEYS and k != "world_size"}
        changes = [f"{k} = {v} (now {getattr(self.cfg, k, '?')})" for k, v in start_up.items() if getattr(self.cfg, k, None) != v]
        filled = ", ".join(f"{k} = {v}" for k, v in values.items()) or "nothing"
        text = f"**{name}** filled: {filled}."
        if changes:
            text += f" Start-up settings it also sets (restart to apply: `{restart}`): " + "; ".join(changes) + "."
        if notes:
            text += " " + " ".join(notes)
        return (*[values.get(k, gr.skip()) for k in keys], text)


# -- the page -----------------------------------------------------------------------------------------------
CSS = """
.wan-banner {background:#fff3cd;border:1px solid #e0b000;color:#5c4400;padding:10px 14px;border-radius:8px;font-weight:600}
.wan-status {padding:6px 2px}
.wan-status.wan-done span {color:#137333} .wan-status.wan-cancelled span {color:#b06000}
.wan-bar {height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden;margin-bottom:4px}
.wan-bar div {height:100%;background:#2563eb;transition:width .3s}
.wan-mem {margin:6px 0} .wan-mem-label, .wan-mem-text {font-size:0.85em}
.wan-mem-track {position:relative;height:14px;background:#e5e7eb;border-radius:4px;overflow:hidden}
.wan-mem-peak {position:absolute;height:100%;background:#93c5fd} .wan-mem-used {position:absolute;height:100%;background:#1d4ed8}
.wan-cluster th {text-align:left;padding-right:12px} .wan-cluster pre {white-space:pre-wrap;font-size:0.8em}
"""


def build_ui(server, cfg: RunConfig) -> gr.Blocks:
    """The whole page; its one API endpoint is /generate."""
    ctl = Controller(server, cfg)
    info, st = ctl.info, server.state
    d = info.defaults
    sizes = list(info.limits.sizes)
    if d["size"] not in sizes:
        sizes.insert(0, d["size"])
    with gr.Blocks(title="Wan2.1 text-to-video", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        if info.random_weights:
            gr.HTML(f'<div class="wan-banner" id="random-weights-banner">Random weights: {html.escape(RANDOM_WEIGHTS_NOTICE)}</div>')
        gr.Markdown(f"## Wan2.1 text-to-video · model {info.key} · {st.rt.world_size} rank(s) · {st.default_layout}")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, max_length=MAX_PROMPT_CHARS, elem_id="prompt",
                                    placeholder="A cat walks on the grass, realistic style.")
                with gr.Accordion("Negative prompt", open=False):
                    negative = gr.Textbox(label="Negative prompt", lines=2, value=d.get("negative_prompt") or "",
                                          max_length=MAX_PROMPT_CHARS, placeholder="empty: the official default negative prompt")
                with gr.Row():
                    size = gr.Dropdown(sizes, value=d["size"], label="Size (W*H)", elem_id="size",
                                    allow_custom_value=info.limits.any_multiple_of_16,
                                    info="any W*H in multiples of 16" if info.limits.any_multiple_of_16 else None)
                    frames = gr.Slider(1, MAX_FRAMES, value=d["frame_num"], step=4, precision=0, label="Frames (4n+1)", elem_id="frames")
                    steps = gr.Slider(1, MAX_STEPS, value=d["sample_steps"], step=1, precision=0, label="Steps", elem_id="steps")
                with gr.Row():
                    guide = gr.Slider(0, 20, value=d["sample_guide_scale"], step=0.1, label="Guidance scale")
                    shift = gr.Slider(0.1, 20, value=d["sample_shift"], step=0.1, label="Shift")
                    solver = gr.Dropdown(list(info.limits.solvers), value=d["sample_solver"], label="Solver")
                with gr.Row():
                    batch = gr.Slider(1, MAX_BATCH, value=d["batch_size"], step=1, precision=0, label="Number of videos")
                    seed = gr.Number(value=d["base_seed"], precision=0, label="Seed (-1 = random)", elem_id="seed")
                    with gr.Column(min_width=120):
                        random_seed = gr.Button("🎲 Random seed", size="sm")
                        reuse_seed = gr.Button("♻ Reuse last seed", size="sm")
                with gr.Accordion("Parallel layout and memory", open=True):
                    with gr.Row():
                        preset = gr.Dropdown([NO_PRESET, *available_presets()], value=NO_PRESET, label="Preset",
                                             elem_id="preset", info="fills the controls below it can")
                        layout = gr.Dropdown(list(ctl.layouts), value=ctl.default_layout, label="Layout (per request)",
                                          elem_id="layout",
                                          info=f"cfg × ring × ulysses = {st.rt.world_size} ranks; Ulysses must divide "
                                               f"the model's {info.num_heads} heads")
                        teacache = gr.Slider(0, 1, value=d["teacache"], step=0.01, label="TeaCache threshold",
                                          elem_id="teacache", info="0 = off; higher skips more steps")
                    preset_note = gr.Markdown(elem_id="preset-note")
                    gr.Markdown("Start-up settings (read-only here; the note under each says how to change it):")
                    with gr.Row():
                        for label, value, how in start_up_rows(server):
                            gr.Textbox(str(value), label=label, info=how, interactive=False, min_width=160)
                with gr.Accordion("LoRAs", open=False):
                    available = list_loras(cfg.model_dir)
                    lora_names = gr.Dropdown(available, value=None, multiselect=True, max_choices=LORA_SLOTS,
                                             label="LoRAs", elem_id="lora-names",
                                             info=f"files in {Path(cfg.model_dir) / 'loras'}; none chosen: "
                                                  "the start-up --lora set")
                    with gr.Row():
                        lora_strengths = [gr.Slider(*STRENGTH_RANGE, value=1.0, step=0.05, label="Strength",
                                                    visible=False, elem_id=f"lora-strength-{i}")
                                          for i in range(LORA_SLOTS)]
                    loras = gr.JSON(None, visible=False, label="loras")
                timesteps = gr.Textbox(d.get("sample_timesteps") or "", visible=False, label="sample_timesteps")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
            with gr.Column(scale=2):
                video = gr.Video(label="Video", elem_id="result-video", autoplay=True, loop=True, interactive=False)
                status = gr.HTML(status_html("idle", "Ready."), label="Status", elem_id="status")
                with gr.Row():
                    seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used",
                                           placeholder="shown after a run")
                    files = gr.File(label="Download", file_count="multiple", interactive=False)
                with gr.Accordion("Settings and timings", open=False):
                    details = gr.JSON(label="Sidecar")
        with gr.Tabs():
            with gr.Tab("History"):
                history = gr.Gallery(label="Earlier generations (newest first)", columns=6, height=320,
                                     elem_id="history", allow_preview=False)
                history_paths = gr.State([])
            with gr.Tab("Cluster", elem_id="cluster-tab"):
                cluster = gr.HTML(cluster_html(server), elem_id="cluster")

        form = [prompt, negative, size, frames, steps, guide, shift, seed, solver, batch, layout, teacache, loras, timesteps]
        for component in form:
            server_checked(component)
        private = {"queue": False, "api_visibility": "private"}
        # Cancel is enabled first: the page runs a trigger's listeners in the order they were added
        run.click(lambda: gr.update(interactive=True), None, stop, **private)
        gen = run.click(ctl.generate, form, [video, files, seed_used, details, status], api_name="generate",
                        concurrency_limit=1, concurrency_id="gpu", show_progress_on=[video])
        gen.then(lambda: gr.update(interactive=False), None, stop, **private).then(
            ctl.panels, None, [history, history_paths, cluster], **private)
        stop.click(ctl.cancel, None, None, **private)
        lora_names.change(lora_slots, lora_names, lora_strengths, **private)
        for trigger in (lora_names, *lora_strengths):
            trigger.change(chosen_loras, [lora_names, *lora_strengths], loras, **private)
        random_seed.click(lambda: -1, None, seed, **private)
        reuse_seed.click(lambda s: int(s) if s and s.isdigit() else -1, seed_used, seed, **private)
        preset.change(ctl.apply_preset, preset,
                      [negative, size, frames, steps, guide, shift, solver, seed, batch, teacache, timesteps, layout,
                       preset_note],
                      **private)
        history.select(ctl.show_history, history_paths, [video, files, seed_used, details], **private)
        demo.load(ctl.panels, None, [history, history_paths, cluster], **private)
    ctl.is_waiting = lambda session: waiting_in_queue(demo, session)
    demo.controller = ctl  # for tests and embedding
    return demo


class RefuseUploads:
    """ASGI middleware: this app takes no files from clients, so Gradio's upload route answers 403."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            from starlette.responses import JSONResponse

            await JSONResponse({"detail": "uploads are disabled on this server"}, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


MAX_JOIN_BYTES = 2**20  # a queue-join body: 12 values, the prompts ≤ 2,000 characters (Gradio itself has no limit)


class GuardQueueJoin:
    """ASGI middleware for POST …/queue/join (every page and API request enters the queue there): a body over
    MAX_JOIN_BYTES answers 413 before Gradio buffers it, and an fn_index that names no event of this app
    answers 422 (Gradio itself answers those with a bare 500). Anything else goes on to Gradio unchanged."""

    def __init__(self, app, fn_indices: Callable[[], Any]) -> None:
        self.app, self.fn_indices = app, fn_indices

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/queue/join"):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_JOIN_BYTES:
                await JSONResponse({"detail": f"request body over {MAX_JOIN_BYTES // 1024} KiB"}, status_code=413)(
                    scope, receive, send)
                return
        body = b"".join(chunks)
        try:
            fn = json.loads(body).get("fn_index")
        except (ValueError, AttributeError, RecursionError):
            fn = None  # not a JSON object: Gradio's own validation answers 422
        if isinstance(fn, int) and not isinstance(fn, bool) and fn not in self.fn_indices():
            await JSONResponse({"detail": f"fn_index: no event {fn} in this app"}, status_code=422)(scope, receive, send)
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


HEALTH_DEADLINE_S = 5.0  # /healthz: how long every rank has to answer the probe (?deadline=S, 0.1 to 30)
HEALTH_PUBLIC_KEYS = ("healthy", "status")


def logged_in(request) -> bool:
    """Whether this HTTP request carries a login of the Gradio app (always true when it has no --auth)."""
    app = request.app
    if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
        return True
    cookie_id = getattr(app, "cookie_id", "")
    token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and (getattr(app, "tokens", None) or {}).get(token) is not None


def healthz_route(server):
    """GET /healthz: 200 when a tiny probe went through every rank within the deadline (or, while a request
    holds the gang, when the heartbeat saw every rank within its timeout); 503 otherwise.

    No login needed for {"healthy", "status"}: load balancers and orchestrators (Kubernetes probes, uptime
    checks) cannot do Gradio's form login, and a health check that needs one cannot see a dead gang. The
    per-rank report (devices, memory, heartbeat age, probe time) is only given to a logged-in client (or to
    anyone when the app has no --auth). The probe runs on its own small thread pool, never on the one Gradio
    runs its handlers on, and concurrent checks share one probe (see Dispatcher.health)."""
    import asyncio
    import math
    from concurrent.futures import ThreadPoolExecutor

    from starlette.responses import JSONResponse
    from starlette.routing import Route

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="wan-healthz")

    async def healthz(request):
        try:
            deadline = float(request.query_params.get("deadline", HEALTH_DEADLINE_S))
        except ValueError:
            deadline = HEALTH_DEADLINE_S
        deadline = min(max(deadline, 0.1), 30.0) if math.isfinite(deadline) else HEALTH_DEADLINE_S
        loop = asyncio.get_running_loop()
        try:
            report = await asyncio.wait_for(loop.run_in_executor(pool, server.dispatcher.health, deadline), deadline + 2)
        except Exception as exc:  # noqa: BLE001 - a check that cannot finish is an unhealthy answer, never a 500
            log.warning("health check did not finish: %s", type(exc).__name__)
            report = {"healthy": False, "status": "unhealthy", "reason": f"the health check did not finish within {deadline + 2:g} s"}
        body = report if logged_in(request) else {k: report.get(k) for k in HEALTH_PUBLIC_KEYS}
        return JSONResponse(body, status_code=200 if report.get("healthy") else 503, headers={"Cache-Control": "no-store"})

    return Route("/healthz", healthz, methods=["GET"])


def serve_ui(server, cfg: RunConfig, auth: list[tuple[str, str]] | None = None) -> None:
    """Queue (one GPU job at a time, at most --queue_size waiting, no way around it) and serve until stopped."""
    from starlette.middleware import Middleware

    outputs = Path(cfg.outputs_dir).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    server.dispatcher.memory()  # every rank's device and memory for the cluster panel from the start
    demo = build_ui(server, cfg)
    demo.queue(default_concurrency_limit=1, max_size=cfg.queue_size, api_open=False)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = cfg.port or unused_port(cfg.listen)  # --port 0: a port of the system's choosing
        try:
            demo.launch(
                server_name=cfg.listen, server_port=port, share=cfg.share, auth=auth,
                auth_message="Wan2.1 text-to-video: log in with the user and password the server was started with.",
                show_error=False,  # only gr.Error messages reach the client; tracebacks stay in the server log
                allowed_paths=[str(outputs)], max_file_size="1mb", enable_monitoring=False, ssr_mode=False,
                run_history=False, mcp_server=False, pwa=False, footer_links=["api"], css=CSS, quiet=False,
                app_kwargs={"middleware": [Middleware(RefuseUploads), Middleware(GuardQueueJoin, fn_indices=lambda: demo.fns.keys())],
                            "routes": [healthz_route(server)]},
                prevent_thread_lock=True,  # returns once serving (the port is bound); blocked on below
            )
            break
        except OSError as exc:  # Gradio: "Cannot find empty port in range: P-P"
            if cfg.port or attempt == PORT_ATTEMPTS:
                raise
            log.warning("port %d was taken before the web server could bind it (%s); trying another", port, exc)
    print(LISTENING.format(host=cfg.listen, port=port, pid=os.getpid()), flush=True)
    demo.block_thread()


PORT_ATTEMPTS = 5  # --port 0: ports tried (one taken between the pick and the bind is replaced)
LISTENING = "Wan2.1 web UI listening on http://{host}:{port} (pid {pid})"  # printed once serving; tests parse it


def unused_port(host: str) -> int:
    """A port that nothing on `host` listens on now (the caller binds it at once, and retries if it lost it)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
