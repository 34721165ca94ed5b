"""ParallelLayout(cfg, ring, ulysses): validation that shows the arithmetic, and process groups per layout.

world = replicas × cfg × ring × ulysses. With context parallel on, replicas must be 1; with it off
(`use_context_parallel: false`) ring = ulysses = 1 and the other ranks hold replicas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("wan.layout")


class LayoutError(ValueError):
    """A layout that cannot run on this world size or model; the message shows why and what would."""


@dataclass(frozen=True)
class ParallelLayout:
    """How the ranks split one request: CFG branches × Ring × Ulysses (× redundant replicas)."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    replicas: int = 1

    @property
    def sp(self) -> int:
        """Sequence-parallel degree."""
        return self.ring * self.ulysses

    @property
    def world(self) -> int:
        return self.replicas * self.cfg * self.ring * self.ulysses

    def __str__(self) -> str:
        parts = [f"cfg {self.cfg}"] if self.cfg > 1 else []
        parts += [f"ulysses {self.ulysses}", f"ring {self.ring}"]
        if self.replicas > 1:
            parts.append(f"{self.replicas} replicas")
        return " × ".join(parts)


def valid_layouts(world: int, heads: int, cfg_options: tuple[int, ...] = (1, 2)) -> list[ParallelLayout]:
    """Every (cfg, ring, ulysses) with product = world and heads divisible by ulysses."""
    out = []
    for c in cfg_options:
        if world % c:
            continue
        sp = world // c
        for u in range(1, sp + 1):
            if sp % u == 0 and heads % u == 0:
                out.append(ParallelLayout(cfg=c, ring=sp // u, ulysses=u))
    return out


def _suggest(world: int, heads: int) -> str:
    opts = [lay for lay in valid_layouts(world, heads) if lay.cfg == 1]
    opts.sort(key=lambda lay: -lay.ulysses)
    text = [f"Ulysses {lay.ulysses} × Ring {lay.ring}" if lay.ulysses > 1 and lay.ring > 1
            else (f"Ulysses {lay.ulysses}" if lay.ring == 1 else f"Ring {lay.ring}") for lay in opts[:4]]
    return " or ".join(text)


def check_layout(layout: ParallelLayout, world: int, heads: int, use_context_parallel: bool = True) -> ParallelLayout:
    """Raise LayoutError (arithmetic + valid alternatives) unless the layout runs on this world and model."""
    for name, v in (("ulysses_size", layout.ulysses), ("ring_size", layout.ring), ("cfg_size", layout.cfg)):
        if v < 1:
            raise LayoutError(f"{name} must be at least 1, got {v}")
    if layout.cfg not in (1, 2):
        raise LayoutError(f"cfg_size must be 1 or 2 (the conditional and unconditional branches), got {layout.cfg}")
    if not use_context_parallel and layout.sp > 1:
        raise LayoutError(
            f"use_context_parallel is false but ulysses_size={layout.ulysses} and ring_size={layout.ring}: "
            "set both to 1, or set use_context_parallel to true"
        )
    if heads % layout.ulysses:
        raise LayoutError(
            f"ulysses_size={layout.ulysses} does not divide the model's {heads} attention heads "
            f"({heads} / {layout.ulysses} = {heads / layout.ulysses:.2f}); Ulysses splits whole heads across ranks. "
            f"Valid for {world} rank{'' if world == 1 else 's'}: {_suggest(world, heads)}"
        )
    if layout.world != world:
        prod = f"cfg_size {layout.cfg} × ring_size {layout.ring} × ulysses_size {layout.ulysses}"
        raise LayoutError(
            f"{prod} = {layout.cfg * layout.ring * layout.ulysses}, but the world size is {world}: "
            f"the product must equal the number of ranks. Valid for {world} rank{'' if world == 1 else 's'} and {heads} heads: {_suggest(world, heads)}"
        )
    return layout


def cross_node_note(layout: ParallelLayout, local_world: int, world: int) -> str | None:
    """Why a layout whose Ulysses groups span nodes will be slow (None when they stay inside a node)."""
    if world <= local_world or layout.ulysses <= local_world:
        return None
    nodes = -(-layout.ulysses // local_world)
    ring = max(1, world // max(1, local_world))
    return (
        f"ulysses_size {layout.ulysses} spans {nodes} nodes of {local_world} GPUs: its 4 all-to-alls per block "
        f"(each moving 3/4 of q, k, v or the output of every rank) cross the inter-node network, typically 10-20x "
        f"slower than NVLink. Ring's point-to-point exchange overlaps compute and tolerates that link: prefer "
        f"ulysses_size {local_world} × ring_size {ring} (Ulysses inside a node, Ring across nodes)"
    )


def default_layout(world: int, heads: int, local_world: int | None = None, use_context_parallel: bool = True,
                   cfg: int = 1) -> ParallelLayout:
    """Ulysses over as many ranks of a node as the heads allow, Ring over the rest (across nodes)."""
    if not use_context_parallel:
        return ParallelLayout(cfg=cfg, replicas=world // cfg)
    sp = world // cfg
    local = min(local_world or sp, sp)
    u = max(d for d in range(1, local + 1) if local % d == 0 and heads % d == 0 and sp % d == 0)
    return ParallelLayout(cfg=cfg, ring=sp // u, ulysses=u)


def resolve_layout(world: int, heads: int, ulysses: int | None, ring: int | None, cfg: int = 1,
                   use_context_parallel: bool = True, local_world: int | None = None) -> ParallelLayout:
    """Fill unset degrees from the world size, then check."""
    if not use_context_parallel:
        lay = ParallelLayout(cfg=cfg, replicas=max(1, world // cfg))
        if (ulysses or 1) > 1 or (ring or 1) > 1:
            return check_layout(ParallelLayout(cfg, ring or 1, ulysses or 1), world, heads, False)
        if world % cfg:
            raise LayoutError(f"cfg_size {cfg} does not divide the world size {world}")
        return lay
    if ulysses is None and ring is None:
        lay = default_layout(world, heads, local_world, True, cfg)
    elif ulysses is None:
        lay = ParallelLayout(cfg, ring, max(1, world // (cfg * ring)))
    elif ring is None:
        lay = ParallelLayout(cfg, max(1, world // (cfg * ulysses)), ulysses)
    else:
        lay = ParallelLayout(cfg, ring, ulysses)
    return check_layout(lay, world, heads)


@dataclass
class LayoutGroups:
    """This rank's process groups and coordinates for one layout."""

    layout: ParallelLayout
    ulysses_group: object = None
    ring_group: object = None
    sp_group: object = None
    cfg_group: object = None
    ulysses_rank: int = 0
    ring_rank: int = 0
    cfg_rank: int = 0
    ring_ranks: tuple[int, ...] = (0,)  # global ranks of this rank's ring, in ring order

    @property
    def sp_rank(self) -> int:
        """Index of this rank's token chunk: ring-major, Ulysses-minor (each ring block is contiguous)."""
        return self.ring_rank * self.layout.ulysses + self.ulysses_rank


class MeshCache:
    """Process groups per layout, created on demand (in lockstep on every rank) and cached.

    At most `keep` layouts keep their groups: the least recently used one is destroyed when another is
    built (every rank sees the same sequence of layouts, so every rank evicts the same one). A new ring is
    warmed up with one batched exchange, so its point-to-point communicators exist before the first
    forward instead of being created inside it."""

    def __init__(self, world: int, rank: int, singletons: bool = False, device=None, keep: int = 4) -> None:
        self.world, self.rank = world, rank
        self.singletons = singletons  # also make 1-rank groups (xDiT's attention wants a group per dim)
        self.device = device
        self.keep = max(1, keep)
        self._cache: dict[ParallelLayout, LayoutGroups] = {}
        self.destroyed = 0

    def get(self, layout: ParallelLayout) -> LayoutGroups:
        if layout in self._cache:
            self._cache[layout] = self._cache.pop(layout)  # most recently used last
            return self._cache[layout]
        while len(self._cache) >= self.keep:
            old = next(iter(self._cache))
            self._destroy(self._cache.pop(old))
        groups = self._build(layout)
        self._warm_up(groups)
        self._cache[layout] = groups
        return groups

    def layouts(self) -> list[ParallelLayout]:
        """The layouts whose groups exist now, least recently used first."""
        return list(self._cache)

    def _destroy(self, groups: LayoutGroups) -> None:
        seen = set()
        for g in (groups.ulysses_group, groups.ring_group, groups.sp_group, groups.cfg_group):
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                dist.destroy_process_group(g)
        self.destroyed += 1
        log.debug("rank %d: destroyed the process groups of layout %s", self.rank, groups.layout)

    def _warm_up(self, groups: LayoutGroups) -> None:
        """One tiny exchange around this rank's ring (creates NCCL's point-to-point communicators now)."""
        if groups.ring_group is None or groups.layout.ring < 2:
            return
        from parallel.usp import ring_exchange

        n, me = groups.layout.ring, groups.ring_rank
        t = torch.zeros(1, device=self.device or "cpu")
        _, works = ring_exchange(t, groups.ring_ranks[(me + 1) % n], groups.ring_ranks[(me - 1) % n], groups.ring_group)
        for w in works:
            w.wait()

    def _build(self, lay: ParallelLayout) -> LayoutGroups:
        """Rank r = ((replica · cfg + c) · ring + g) · ulysses + u; every rank creates every group."""
        if self.world == 1:
            return LayoutGroups(lay)
        dims = (lay.replicas, lay.cfg, lay.ring, lay.ulysses)

        def coords(r: int) -> tuple[int, int, int, int]:
            u = r % dims[3]
            g = (r // dims[3]) % dims[2]
            c = (r // (dims[3] * dims[2])) % dims[1]
            return r // (dims[3] * dims[2] * dims[1]), c, g, u

        me = coords(self.rank)
        out = LayoutGroups(lay, cfg_rank=me[1], ring_rank=me[2], ulysses_rank=me[3])

        def groups_along(keep: tuple[int, ...]):
            """Partition the ranks by equal coordinates on the dims NOT in keep; new_group for each part."""
            parts: dict[tuple, list[int]] = {}
            for r in range(self.world):
                c = coords(r)
                parts.setdefault(tuple(c[i] for i in range(4) if i not in keep), []).append(r)
            mine = None
            for ranks in parts.values():
                g = dist.new_group(ranks=ranks, backend=None) if len(ranks) > 1 or self.singletons else None
                if self.rank in ranks:
                    mine = (g, tuple(ranks))
            return mine

        out.ulysses_group = groups_along((3,))[0]
        out.ring_group, out.ring_ranks = groups_along((2,))
        out.sp_group = groups_along((2, 3))[0]
        out.cfg_group = groups_along((1,))[0]
        log.debug("rank %d: created process groups for layout %s", self.rank, lay)
        return out
