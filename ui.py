"""The Gradio web UI, hosted by rank 0. Imported only there (workers never import gradio).

It talks to the gang only through `server.dispatcher` (validate / submit / cancel / info) and reads
`server.state`, `server.cfg` and `server.last_memory` for the cluster panel. Every value a browser or an
API client sends is checked by `dispatcher.validate`; a refusal is a `gr.Error` naming the field. The pure
helpers (text, HTML, the layout sliders' rules) are in ui_parts.py; docs/UI.md describes the page.
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

from engine.cli import RunConfig, upload_dir
from engine.images import MAX_IMAGE_BYTES
from engine.lora import STRENGTH_RANGE, list_loras
from engine.pipeline import Cancelled
from engine.request import (
    MAX_BATCH,
    MAX_FRAMES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    RequestError,
    parse_timesteps,
    validate_request,
)
from engine.tiny import RANDOM_WEIGHTS_NOTICE
from engine.video import read_sidecar
from parallel.faults import ServerRestarting
from parallel.layout import LayoutError
from parallel.serve import RankFailed
from presets import available_presets, load_preset
from ui_parts import (
    IMAGE_FIELDS,
    LAYOUT_FIELDS,
    LORA_SLOTS,
    ONE_RANK_NOTE,
    TASK_WORDS,
    adjust_layout,
    auto_preset,
    check_layout_sizes,
    chosen_loras,
    cluster_html,
    done_text,
    field_error,
    fmt_seconds,
    fmt_value,
    history_items,
    image_inputs,
    image_text,
    int_or_none,
    layout_field,
    lora_slots,
    memory_mode,
    plural,
    progress_text,
    restored_form,
    server_checked,
    shift_for_size,
    waiting_in_queue,
)
from uploads import GuardFileData, GuardFiles, GuardUploads, Uploads, forward_with_body, upload_path

log = logging.getLogger("wan.ui")

NO_PRESET = "(start-up settings)"
AUTO_PRESET = "auto"  # presets/auto.py: computed, not a JSON file
# Settings a request can change; everything else in a preset applies at start-up only.
REQUEST_KEYS = ("negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale", "sample_shift",
                "sample_solver", "base_seed", "batch_size", "teacache", "sample_timesteps", "offload_percent",
                "blocks_to_swap")
LAYOUT_KEYS = LAYOUT_FIELDS
MEMORY_KEYS = ("offload_percent", "blocks_to_swap")  # per request; the engine re-plans the weights when they change
# The form's inputs of /generate, in the order of Controller.generate's parameters (the API's names).
FORM_KEYS = ("prompt", "negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale", "sample_shift",
             "base_seed", "sample_solver", "batch_size", "ulysses_size", "ring_size", "cfg_size", "offload_percent",
             "blocks_to_swap", "teacache", "loras", "sample_timesteps")
IMAGE_KEYS = IMAGE_FIELDS  # then, for image-to-video models only: image (and last_frame), as uploaded files
# What a history item restores, in the order of Controller.show_history's outputs after video, files, seed,
# sidecar and status.
RESTORE_KEYS = ("prompt", "negative_prompt", "size", "frame_num", "sample_steps", "sample_guide_scale", "sample_shift",
                "sample_solver", "base_seed", "batch_size", "teacache", "sample_timesteps", *LAYOUT_FIELDS,
                "offload_percent", "blocks_to_swap")


def all_presets() -> list[str]:
    """The preset menu: the shipped JSON presets and `auto`, sorted."""
    return sorted({*available_presets(), AUTO_PRESET})


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
        jobs = getattr(server, "jobs", None)  # parallel/job_queue.py: the page's requests join the API's queue
        self.runner = jobs.page_runner() if jobs is not None else self.dispatcher  # submit / cancel
        self.info = self.dispatcher.info
        self.state = server.state
        self._lock = threading.Lock()
        self.job: Job | None = None
        self._cancel_queued: set[str] = set()
        self.uploads = Uploads(upload_dir(cfg), cfg.outputs_dir, enabled=self.info.limits.image_inputs > 0)
        self.is_waiting: Callable[[str], bool] = lambda session: False  # set by build_ui: in Gradio's queue?

    # -- request ------------------------------------------------------------------------------------------
    def raw_request(self, prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale, sample_shift,
                    base_seed, sample_solver, batch_size, ulysses_size=None, ring_size=None, cfg_size=None,
                    offload_percent=None, blocks_to_swap=None, teacache=None, loras=None,
                    sample_timesteps=None, image=None, last_frame=None) -> dict:
        """The form's values as a raw request, checked by dispatcher.validate (gr.Error naming the field).
        Explicit timesteps apply while Steps equals their count (the Steps control wins otherwise). Unset
        layout sizes and memory settings are the server's defaults."""
        try:
            timesteps = parse_timesteps(sample_timesteps) or None
            if timesteps and sample_steps is not None and int_or_none(sample_steps) != len(timesteps):
                timesteps = None
            raw = {"prompt": prompt, "negative_prompt": negative_prompt, "size": size, "frame_num": frame_num,
                   "sample_steps": sample_steps, "sample_guide_scale": sample_guide_scale, "sample_shift": sample_shift,
                   "sample_solver": sample_solver, "base_seed": base_seed, "batch_size": batch_size,
                   "teacache": teacache, "ulysses_size": ulysses_size, "ring_size": ring_size, "cfg_size": cfg_size,
                   "offload_percent": offload_percent, "blocks_to_swap": blocks_to_swap, "loras": loras,
                   "sample_timesteps": timesteps}
            raw.update({k: upload_path(v) for k, v in zip(IMAGE_KEYS, (image, last_frame)) if v is not None})
            # the field checks first: layout_for (in dispatcher.validate) takes only numbers, never "2" or 2.0
            req = validate_request(raw, self.info.limits, self.info.defaults)
            raw.update({k: getattr(req, k) for k in (*LAYOUT_FIELDS, *MEMORY_KEYS) if raw[k] is not None})
            raw["sample_steps"] = self.dispatcher.validate(raw).sample_steps  # null → the default, for the progress bar
        except RequestError as exc:
            raise field_error(layout_field(exc)) from None
        return raw

    def generate(self, prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale, sample_shift,
                 base_seed, sample_solver, batch_size, ulysses_size, ring_size, cfg_size, offload_percent,
                 blocks_to_swap, teacache, request: gr.Request, loras=None, sample_timesteps=None, image=None,
                 last_frame=None, progress=gr.Progress()):  # noqa: B008 - Gradio's way to ask for a progress tracker
        """Generate video(s) from a text prompt (and the uploaded first / last frame of an image-to-video model);
        returns the mp4 first, then files, seed used, metadata, and a plain-text status line. A refusal or
        failure also sets the status line to its message. The uploads are deleted once the request ends."""
        try:
            yield from self._generate(prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale,
                                      sample_shift, base_seed, sample_solver, batch_size, ulysses_size, ring_size,
                                      cfg_size, offload_percent, blocks_to_swap, teacache, request, loras,
                                      sample_timesteps, image, last_frame, progress)
        finally:
            self.uploads.release(upload_path(image), upload_path(last_frame))

    def _generate(self, prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale, sample_shift,
                  base_seed, sample_solver, batch_size, ulysses_size, ring_size, cfg_size, offload_percent,
                  blocks_to_swap, teacache, request, loras, sample_timesteps, image, last_frame, progress):
        skip = gr.skip()
        try:
            raw = self.raw_request(prompt, negative_prompt, size, frame_num, sample_steps, sample_guide_scale,
                                   sample_shift, base_seed, sample_solver, batch_size, ulysses_size, ring_size,
                                   cfg_size, offload_percent, blocks_to_swap, teacache, loras, sample_timesteps,
                                   image, last_frame)
        except gr.Error as err:
            yield skip, skip, skip, skip, f"Error: {getattr(err, 'plain', err.message)}"
            raise
        session = getattr(request, "session_hash", None) or "anonymous"
        with self._lock:
            if session in self._cancel_queued:
                self._cancel_queued.discard(session)
                yield skip, skip, skip, skip, "Cancelled before it started."
                return
            job = self.job = Job(session, raw)
        total = raw["sample_steps"]
        thread = threading.Thread(target=self._run, args=(job,), name="wan-generate", daemon=True)
        thread.start()
        progress((0, total), desc="encoding the prompt", unit="step")
        yield skip, skip, skip, skip, "Encoding the prompt…"
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
                    yield skip, skip, skip, skip, text
                elif kind == "done":
                    out = payload
                    files = [str(p) for p in out.videos] + [str(p) for p in out.sidecars]
                    yield str(out.videos[0]), files, str(out.request.base_seed), out.meta, done_text(out)
                    return
                elif kind == "cancelled":
                    at = re.search(r"step (\d+)", payload)
                    yield skip, skip, skip, skip, f"Cancelled at step {at.group(1) if at else job.steps_done} of {total}."
                    return
                elif kind == "invalid":
                    err = field_error(layout_field(payload))
                    yield skip, skip, skip, skip, f"Error: {err.plain}"
                    raise err
                else:
                    yield skip, skip, skip, skip, f"Error: generation failed: {payload}"
                    raise gr.Error(html.escape(payload, quote=False), title="Generation failed", print_exception=False)
        finally:
            if thread.is_alive():  # the page went away mid-run: stop the gang at the next step
                job.cancel_requested = True
                self.runner.cancel()
            with self._lock:
                if self.job is job:
                    self.job = None

    def _run(self, job: Job) -> None:
        def on_step(done: int, total: int, seconds: float) -> None:
            if job.cancel_requested:
                self.runner.cancel()  # a cancel that came before the gang was busy
            job.events.put(("step", (done, total, seconds)))

        try:
            job.events.put(("done", self.runner.submit(job.raw, progress=on_step)))
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
                self.runner.cancel()
                gr.Info("Cancelling at the next step…")
            elif self.is_waiting(session):
                self._cancel_queued.add(session)
                gr.Info("Your request is waiting in the queue: it will be dropped when its turn comes.")
            else:
                gr.Info("Nothing of yours is running or waiting.")

    # -- the layout sliders -------------------------------------------------------------------------------
    def moved(self, which: str) -> Callable[[Any, Any, Any], tuple[int, int, int]]:
        """The handler of one layout slider: the other sizes follow where they can (ui_parts.adjust_layout)."""
        return lambda u, r, c: adjust_layout(self.state, which, u, r, c)

    def layout_note(self, ulysses: Any, ring: Any, cfg: Any) -> str:
        """The note next to the sliders: what runs, or why the combination cannot."""
        if self.state.rt.world_size == 1:
            return f"{ONE_RANK_NOTE}. " + check_layout_sizes(self.state, ulysses, ring, cfg)[1]
        lay, text = check_layout_sizes(self.state, ulysses, ring, cfg)
        return text if lay is not None else f"⚠ {text}"

    # -- panels -------------------------------------------------------------------------------------------
    def panels(self):
        jobs = getattr(self.server, "jobs", None)  # the job store's completed jobs (the API's too), newest first
        gallery, paths = history_items(self.cfg.outputs_dir, jobs.history() if jobs is not None else None)
        return gallery, paths, cluster_html(self.server)

    def show_history(self, paths: list[str], evt: gr.SelectData):
        """A history item back on the page: its video and files, and its settings in the form."""
        if evt is None or not paths or not 0 <= evt.index < len(paths):
            return tuple(gr.skip() for _ in range(5 + len(RESTORE_KEYS)))
        video = paths[evt.index]
        try:
            meta = read_sidecar(video)
        except (OSError, ValueError):
            meta = {}
        sidecar = str(Path(video).with_suffix(".json"))
        files = [video, sidecar] if Path(sidecar).exists() else [video]
        form = restored_form(meta, self.state)
        shown = f"Showing {Path(video).name} from the history; its settings are back in the form."
        if image_text(meta):
            shown += f" It was made from the {image_text(meta)}; uploads are not kept: upload the image again."
        return (video, files, str(meta.get("seed", "")), meta, shown, *[form.get(k, gr.skip()) for k in RESTORE_KEYS])

    def apply_preset(self, name: str | None):
        """The preset's request settings into the form (layout sizes where they fit this gang); its start-up
        settings explained in a note. Returns one value per REQUEST_KEYS, then ulysses, ring, cfg, the note."""
        keys = (*REQUEST_KEYS, *LAYOUT_KEYS)
        lay = self.state.default_layout
        defaults = {**self.info.defaults, **memory_mode(self.server), "ulysses_size": lay.ulysses,
                    "ring_size": lay.ring, "cfg_size": lay.cfg}
        if not name or name == NO_PRESET:
            return (*[defaults.get(k) for k in keys], "Form reset to this server's start-up settings.")
        try:
            preset = auto_preset(self.server) if name == AUTO_PRESET else load_preset(name)
        except (FileNotFoundError, ValueError) as exc:
            raise gr.Error(html.escape(f"preset: {exc}", quote=False), print_exception=False) from None
        values: dict[str, Any] = {k: preset[k] for k in REQUEST_KEYS if k in preset}
        if "blocks_to_swap" in values:
            values["blocks_to_swap"] = min(int(values["blocks_to_swap"]), self.info.limits.num_blocks)
        if isinstance(values.get("sample_timesteps"), (list, tuple)):
            values["sample_timesteps"] = ",".join(f"{t:g}" for t in values["sample_timesteps"])
        notes = []
        if any(k in preset for k in LAYOUT_KEYS):
            try:
                fit = self.state.layout_for(*(preset.get(k) for k in LAYOUT_KEYS))
                values.update(ulysses_size=fit.ulysses, ring_size=fit.ring, cfg_size=fit.cfg)
            except LayoutError as exc:
                notes.append(f"Its layout does not fit this gang, kept the current one: {exc}")
        world, ranks = preset.get("world_size"), self.server.rt.world_size
        restart = f"./launch.sh --preset {name}"
        if world and world != ranks:
            restart = f"./launch.sh --nproc {world} --preset {name}"
            notes.append(f"It is made for {plural(world, 'rank')}; this server runs {plural(ranks, 'rank')}.")
        if name == AUTO_PRESET:
            notes.append("auto picks the memory settings from the smallest GPU's memory and the model's size.")
        start_up = {k: v for k, v in preset.items() if k not in REQUEST_KEYS and k not in LAYOUT_KEYS and k != "world_size"}
        changes = [f"{k} = {fmt_value(v)} (now {fmt_value(getattr(self.cfg, k, '?'))})"
                   for k, v in start_up.items() if getattr(self.cfg, k, None) != v]
        filled = ", ".join(f"{k} = {fmt_value(v)}" for k, v in values.items()) or "nothing"
        text = f"**{name}** filled: {filled}."
        if changes:
            text += f" Start-up settings it also sets (restart to apply: `{restart}`): " + "; ".join(changes) + "."
        if notes:
            text += " " + " ".join(notes)
        return (*[values.get(k, gr.skip()) for k in keys], text)


# -- the page -----------------------------------------------------------------------------------------------
CSS = """
.wan-banner {background:#fff3cd;border:1px solid #e0b000;color:#5c4400;padding:6px 12px;border-radius:8px;font-weight:600;font-size:0.85em}
#title h2 {margin:0}
#status textarea {font-weight:600}
#layout-note, #preset-note {font-size:0.9em}
#files .file-preview .filename {white-space:normal;overflow:visible}
#files .file-preview .stem, #files .file-preview .ext {overflow:visible;text-overflow:clip;white-space:nowrap}
#files .file-preview td.filename {max-width:none;word-break:break-all}
#history .thumbnail-item {max-width:200px;max-height:150px}
#history .grid-container {grid-template-columns:repeat(auto-fill, minmax(160px, 200px)) !important;grid-auto-rows:150px !important}
.wan-mem {margin:6px 0} .wan-mem-label, .wan-mem-text {font-size:0.85em}
.wan-mem-track {position:relative;height:14px;background:#e5e7eb;border-radius:4px;overflow:hidden}
.wan-mem-peak {position:absolute;height:100%;background:#93c5fd} .wan-mem-used {position:absolute;height:100%;background:#1d4ed8}
.wan-cluster th {text-align:left;padding-right:12px} .wan-cluster .wan-how {color:#6b7280;font-size:0.85em;padding-left:12px}
.wan-cluster pre {white-space:pre-wrap;font-size:0.8em}
"""


def build_ui(server, cfg: RunConfig) -> gr.Blocks:
    """The whole page; its one API endpoint is /generate."""
    ctl = Controller(server, cfg)
    info, st = ctl.info, server.state
    d = info.defaults
    world, lay, mode = st.rt.world_size, st.default_layout, memory_mode(server)
    sizes = list(info.limits.sizes)
    if d["size"] not in sizes:
        sizes.insert(0, d["size"])
    task = TASK_WORDS[info.limits.image_inputs]
    size_info = "any W*H in multiples of 16" if info.limits.any_multiple_of_16 else None
    if info.limits.image_inputs:
        size_info = "the area; the shape follows the image" + (f" ({size_info})" if size_info else "")
    if d.get("sample_shift") is None:  # I2V 14B: the official shift goes with the size (3.0 at 480p, else 5.0)
        d = {**d, "sample_shift": shift_for_size(d["size"])}
    with gr.Blocks(title=f"Wan2.1 {task}", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        if info.random_weights:
            gr.HTML(f'<div class="wan-banner" id="random-weights-banner">Random weights: {html.escape(RANDOM_WEIGHTS_NOTICE)}</div>')
        gr.Markdown(f"## Wan2.1 {task} · model {info.key} · {plural(world, 'rank')} · {lay}", elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, max_length=MAX_PROMPT_CHARS, elem_id="prompt",
                                    placeholder="A cat walks on the grass, realistic style.")
                images = image_inputs(info.limits.image_inputs)  # [] for text-to-video
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                    stop = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel", scale=1)
                status = gr.Textbox("Ready.", label="Status", elem_id="status", interactive=False, max_lines=2)
                with gr.Row():
                    size = gr.Dropdown(sizes, value=d["size"], label="Size (W*H)", elem_id="size",
                                       allow_custom_value=info.limits.any_multiple_of_16, info=size_info)
                    frames = gr.Slider(1, MAX_FRAMES, value=d["frame_num"], step=4, precision=0, label="Frames (4n+1)", elem_id="frames")
                    steps = gr.Slider(1, MAX_STEPS, value=d["sample_steps"], step=1, precision=0, label="Steps", elem_id="steps")
                with gr.Accordion("Parallel layout and memory (per request)", open=True):
                    with gr.Row():
                        preset = gr.Dropdown([NO_PRESET, *all_presets()], value=NO_PRESET, label="Preset",
                                             elem_id="preset", info="fills the controls it can")
                        fixed = world == 1
                        layout_info = ONE_RANK_NOTE if fixed else f"cfg × ring × ulysses = {plural(world, 'rank')}"
                        ulysses = gr.Slider(1, max(world, 2), value=lay.ulysses, step=1, precision=0,
                                            label="Ulysses size (ulysses_size)", elem_id="ulysses",
                                            interactive=not fixed and st.use_context_parallel,
                                            info=f"splits the {info.num_heads} heads: must divide them")
                        ring = gr.Slider(1, max(world, 2), value=lay.ring, step=1, precision=0,
                                         label="Ring size (ring_size)", elem_id="ring",
                                         interactive=not fixed and st.use_context_parallel, info=layout_info)
                        cfg_size = gr.Radio([1, 2], value=lay.cfg, label="CFG parallel (cfg_size)", elem_id="cfg",
                                            interactive=not fixed and world % 2 == 0,
                                            info="2: the two guidance branches on separate ranks")
                    layout_note = gr.Markdown(ctl.layout_note(lay.ulysses, lay.ring, lay.cfg), elem_id="layout-note")
                    fsdp = " With FSDP offload moves whole blocks (each rank its own shards)." if st.dit_fsdp else ""
                    with gr.Row():
                        offload = gr.Slider(0, 1, value=mode["offload_percent"], step=0.05, label="CPU offload (offload_percent)",
                                            elem_id="offload", info=f"share of the DiT's weights kept in host memory.{fsdp}")
                        swap = gr.Slider(0, info.limits.num_blocks, value=mode["blocks_to_swap"], step=1, precision=0,
                                         label="Block swap (blocks_to_swap)", elem_id="swap",
                                         info=f"of the DiT's {info.limits.num_blocks} blocks, swapped in from host memory")
                        teacache = gr.Slider(0, 1, value=d["teacache"], step=0.01, label="TeaCache threshold",
                                             elem_id="teacache", info="0 = off; higher skips more steps")
                    preset_note = gr.Markdown(elem_id="preset-note")
                with gr.Accordion("More settings: guidance, seed, negative prompt", open=False):
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
                    negative = gr.Textbox(label="Negative prompt", lines=2, value=d.get("negative_prompt") or "",
                                          elem_id="negative", max_length=MAX_PROMPT_CHARS,
                                          placeholder="empty: the official default negative prompt")
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
            with gr.Column(scale=2):
                video = gr.Video(label="Video", elem_id="result-video", autoplay=True, loop=True, interactive=False,
                                 height=340)
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used",
                                       placeholder="shown after a run")
                files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files")
                with gr.Accordion("Settings and timings", open=False):
                    details = gr.JSON(label="Sidecar", elem_id="details")
        with gr.Tabs():
            with gr.Tab("History"):
                history = gr.Gallery(label="Earlier generations (newest first; click one to restore its settings)",
                                     columns=6, height=200, object_fit="contain", elem_id="history",
                                     allow_preview=False)
                history_paths = gr.State([])
            with gr.Tab("Cluster", elem_id="cluster-tab"):
                cluster = gr.HTML(cluster_html(server), elem_id="cluster")

        form = [prompt, negative, size, frames, steps, guide, shift, seed, solver, batch, ulysses, ring, cfg_size,
                offload, swap, teacache, loras, timesteps]
        for component in form:
            server_checked(component)
        private = {"queue": False, "api_visibility": "private"}
        # Cancel is enabled first: the page runs a trigger's listeners in the order they were added
        run.click(lambda: gr.update(interactive=True), None, stop, **private)
        gen = run.click(ctl.generate, form + images, [video, files, seed_used, details, status], api_name="generate",
                        concurrency_limit=1, concurrency_id="gpu", show_progress_on=[video], scroll_to_output=False)
        gen.then(lambda: gr.update(interactive=False), None, stop, **private).then(
            ctl.panels, None, [history, history_paths, cluster], **private)
        if images:  # the request deleted its uploads: the boxes say so by emptying
            gen.then(lambda: None if len(images) == 1 else (None,) * len(images), None, images, **private)
        if info.defaults.get("sample_shift") is None:  # I2V 14B: the shift follows the size the user picks
            size.input(shift_for_size, size, shift, **private)
        stop.click(ctl.cancel, None, None, **private)
        sliders = [ulysses, ring, cfg_size]
        for which, slider in zip(("ulysses", "ring", "cfg"), sliders):
            slider.input(ctl.moved(which), sliders, sliders, **private, show_progress="hidden")
            slider.change(ctl.layout_note, sliders, layout_note, **private, show_progress="hidden")
        lora_names.change(lora_slots, lora_names, lora_strengths, **private)
        for trigger in (lora_names, *lora_strengths):
            trigger.change(chosen_loras, [lora_names, *lora_strengths], loras, **private)
        random_seed.click(lambda: -1, None, seed, **private)
        reuse_seed.click(lambda s: int(s) if s and s.isdigit() else -1, seed_used, seed, **private)
        preset.change(ctl.apply_preset, preset,
                      [negative, size, frames, steps, guide, shift, solver, seed, batch, teacache, timesteps, offload,
                       swap, ulysses, ring, cfg_size, preset_note],
                      **private)
        history.select(ctl.show_history, history_paths,
                       [video, files, seed_used, details, status, prompt, negative, size, frames, steps, guide, shift, solver,
                        seed, batch, teacache, timesteps, ulysses, ring, cfg_size, offload, swap], **private)
        demo.load(ctl.panels, None, [history, history_paths, cluster], **private)
    ctl.is_waiting = lambda session: waiting_in_queue(demo, session)
    demo.controller = ctl  # for tests and embedding
    return demo


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
        await forward_with_body(self.app, scope, body, receive, send)


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
    from parallel.api import api_routes
    from parallel.job_queue import start_jobs

    jobs = start_jobs(server, cfg)  # outputs/jobs.sqlite: what the last gang left queued or running goes on
    demo = build_ui(server, cfg)
    uploads = demo.controller.uploads  # the upload and file routes' guards share its record of the uploads
    demo.queue(default_concurrency_limit=1, max_size=cfg.queue_size, api_open=False)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = cfg.port or unused_port(cfg.listen)  # --port 0: a port of the system's choosing
        try:
            demo.launch(
                server_name=cfg.listen, server_port=port, share=cfg.share, auth=auth,
                auth_message="Wan2.1 text-to-video: log in with the user and password the server was started with.",
                show_error=False,  # only gr.Error messages reach the client; tracebacks stay in the server log
                allowed_paths=[str(outputs)], blocked_paths=jobs.store.private_paths(),
                max_file_size=MAX_IMAGE_BYTES if uploads.enabled else "1mb", enable_monitoring=False, ssr_mode=False,
                run_history=False, mcp_server=False, pwa=False, footer_links=["api"], css=CSS, quiet=False,
                app_kwargs={"middleware": [Middleware(GuardUploads, uploads=uploads), Middleware(GuardFiles, uploads=uploads),
                                           Middleware(GuardQueueJoin, fn_indices=lambda: demo.fns.keys()),
                                           Middleware(GuardFileData, uploads=uploads)],
                            "routes": [healthz_route(server), *api_routes(server, cfg, jobs)]},
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
