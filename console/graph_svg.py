"""The workflow graph of a run as inline SVG, laid out on the server.

:func:`layout` is pure: from the definition's nodes and edges (``after`` edges and a route's
targets) it places nodes in layers left to right (a node one layer right of its furthest
predecessor; an edge back to an earlier layer is a loop, drawn as an arc under the nodes).
A map is one node marked with its item count. :func:`graph_svg` draws it with each node's
state as a class (coloured by the stylesheet), a text label and a ``<title>``, so the state is
never told by colour alone; a node that ran links to its step on the page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from orchestration.definition import Workflow

#: Node states, in the words the page shows.
STATE_LABELS = {
    "not_started": "not started",
    "running": "running",
    "waiting": "waiting",
    "done": "done",
    "failed": "failed",
    "escalated": "escalated",
    "skipped": "skipped",
    "compensated": "compensated",
}
#: A glyph beside the label, so states differ in shape as well as colour.
STATE_MARKS = {
    "not_started": "○",
    "running": "▶",
    "waiting": "‖",
    "done": "✓",
    "failed": "✗",
    "escalated": "!",
    "skipped": "↷",
    "compensated": "↺",
}

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 150, 46, 50, 22, 16


@dataclass
class Placed:
    name: str
    kind: str
    layer: int
    row: int
    x: int = 0
    y: int = 0


@dataclass
class Layout:
    nodes: dict[str, Placed] = field(default_factory=dict)
    #: (source, target, is_loop)
    edges: list[tuple[str, str, bool]] = field(default_factory=list)
    width: int = 0
    height: int = 0


def _edges(wf: Workflow) -> list[tuple[str, str]]:
    edges: list[tuple[str, str]] = []
    for node in wf.nodes.values():
        edges.extend((pred, node.name) for pred in node.after)
        edges.extend((node.name, target) for target in node.targets if target in wf.nodes)
    return list(dict.fromkeys(edges))


def layout(wf: Workflow) -> Layout:
    """Layers by longest path from the start nodes over forward edges (definition order breaks
    ties; an edge to a node already placed at or left of its source is a loop)."""
    order = list(wf.nodes)
    edges = _edges(wf)
    layer: dict[str, int] = {}
    loops: set[tuple[str, str]] = set()
    # Visit in definition order (a node is defined after its ``after`` predecessors).
    for name in order:
        preds = [s for s, t in edges if t == name and s in layer]
        layer[name] = max((layer[p] + 1 for p in preds), default=0)
    for s, t in edges:
        if layer[t] <= layer[s]:
            loops.add((s, t))
    # Route targets defined earlier than their router were placed before it: push forward
    # targets of a route that are not loops (a later target) one layer past their source.
    for _ in range(len(order)):
        moved = False
        for s, t in edges:
            if (s, t) not in loops and layer[t] <= layer[s]:
                layer[t] = layer[s] + 1
                moved = True
        if not moved:
            break
    rows: dict[int, int] = {}
    out = Layout()
    for name in order:
        n = layer[name]
        row = rows.get(n, 0)
        rows[n] = row + 1
        out.nodes[name] = Placed(
            name,
            wf.nodes[name].kind,
            n,
            row,
            PAD + n * (NODE_W + GAP_X),
            PAD + row * (NODE_H + GAP_Y),
        )
    out.edges = [(s, t, (s, t) in loops) for s, t in edges]
    layers = max(layer.values(), default=0) + 1
    tallest = max(rows.values(), default=1)
    out.width = 2 * PAD + layers * NODE_W + (layers - 1) * GAP_X
    out.height = 2 * PAD + tallest * NODE_H + (tallest - 1) * GAP_Y + (30 if loops else 0)
    return out


def _edge_path(a: Placed, b: Placed, loop: bool, bottom: int) -> str:
    if loop:
        x1, x2 = a.x + NODE_W // 2, b.x + NODE_W // 2
        y1, y2 = a.y + NODE_H, b.y + NODE_H
        return f"M{x1},{y1} C{x1},{bottom} {x2},{bottom} {x2},{y2}"
    x1, y1 = a.x + NODE_W, a.y + NODE_H // 2
    x2, y2 = b.x, b.y + NODE_H // 2
    mid = (x1 + x2) // 2
    return f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"


def graph_svg(
    wf: Workflow,
    states: Mapping[str, str],
    *,
    anchors: Mapping[str, str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> SafeString:
    """The graph as an ``<svg>`` element. ``states``: node name → a key of
    :data:`STATE_LABELS` (missing: not started); ``anchors``: node name → the id of its step
    on the page; ``notes``: node name → a short extra line (a map's item count, visits)."""
    placed = layout(wf)
    anchors = anchors or {}
    notes = notes or {}
    bottom = placed.height - 6
    parts = [
        f'<svg class="run-graph" role="group" aria-labelledby="run-graph-title run-graph-desc" '
        f'viewBox="0 0 {placed.width} {placed.height}" width="{placed.width}" height="{placed.height}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<title id="run-graph-title">Workflow {escape(wf.name)} v{wf.version}</title>',
        '<desc id="run-graph-desc">'
        + escape(
            "; ".join(
                f"{name}: {STATE_LABELS[states.get(name, 'not_started')]}" for name in placed.nodes
            )
        )
        + "</desc>",
        '<defs><marker id="run-graph-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="run-graph-head"/>'
        "</marker></defs>",
    ]
    for s, t, loop in placed.edges:
        a, b = placed.nodes[s], placed.nodes[t]
        cls = "run-graph-edge run-graph-loop" if loop else "run-graph-edge"
        parts.append(
            f'<path class="{cls}" d="{_edge_path(a, b, loop, bottom)}" marker-end="url(#run-graph-arrow)">'
            f"<title>{escape(s)} → {escape(t)}{' (loop)' if loop else ''}</title></path>"
        )
    for p in placed.nodes.values():
        state = states.get(p.name, "not_started")
        if state not in STATE_LABELS:
            state = "not_started"
        label = STATE_LABELS[state]
        note = notes.get(p.name, "")
        kind = {"map": "map", "route": "route", "wait": "wait"}.get(p.kind, "")
        shape = (
            f'<rect class="run-graph-stack" x="{p.x + 4}" y="{p.y - 4}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            if p.kind == "map"
            else ""
        )
        body = (
            f'<g class="run-graph-node state-{state} kind-{p.kind}" data-node="{escape(p.name)}">'
            f"<title>{escape(p.name)}: {label}{(' — ' + escape(note)) if note else ''}</title>"
            f"{shape}"
            f'<rect x="{p.x}" y="{p.y}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            f'<text x="{p.x + 8}" y="{p.y + 18}" class="run-graph-name">{escape(p.name[:18])}'
            f"{(' · ' + kind) if kind else ''}</text>"
            f'<text x="{p.x + 8}" y="{p.y + 36}" class="run-graph-state">{STATE_MARKS[state]} {label}'
            f"{(' · ' + escape(note)) if note else ''}</text>"
            "</g>"
        )
        if p.name in anchors:
            body = f'<a href="#{escape(anchors[p.name])}">{body}</a>'
        parts.append(body)
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every interpolated text is escaped above


def node_states(
    steps: list, open_escalation_steps: set[int]
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Per node: its state (from its latest visit's steps), the page anchor of its latest step,
    and a note (visits, map items). ``steps`` are a run's steps in id order."""
    states: dict[str, str] = {}
    anchors: dict[str, str] = {}
    notes: dict[str, str] = {}
    visits: dict[str, int] = {}
    items: dict[str, int] = {}
    compensated: set[str] = set()
    by_id = {s.pk: s for s in steps}
    for step in steps:
        if step.kind == "compensate":
            original = by_id.get(step.parent_id or 0)
            if original is not None and step.status == "succeeded":
                compensated.add(original.node)
            continue
        if step.kind == "item":
            items[step.node] = items.get(step.node, 0) + 1
            continue
        visits[step.node] = max(visits.get(step.node, 0), step.visit)
        anchors[step.node] = f"step-{step.pk}"
        if step.pk in open_escalation_steps:
            states[step.node] = "escalated"
        else:
            states[step.node] = {
                "pending": "running",
                "queued": "running",
                "running": "running",
                "waiting": "waiting",
                "succeeded": "done",
                "failed": "failed",
                "cancelled": "skipped",
                "skipped": "skipped",
            }.get(step.status, "not_started")
    for name in compensated:
        states[name] = "compensated"
    for name, n in visits.items():
        if n > 1:
            notes[name] = f"{n} visits"
    for name, n in items.items():
        notes[name] = f"{n} items"
    return states, anchors, notes
