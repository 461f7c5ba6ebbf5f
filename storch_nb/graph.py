"""The stochastic computation graph that a story runs as (loops unrolled)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Node", "Graph", "KINDS"]

#: the kinds of node, as drawn: params and inputs are leaves, deterministic
#: steps are rectangles, stochastic steps (sites) ellipses, costs the objective.
KINDS = ("param", "input", "deterministic", "stochastic", "cost")


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    line: int | None  # 1-based story line (None for namespace leaves)


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        self._parents: dict[str, list[str]] = {}
        for a, b in self.edges:
            self._parents.setdefault(b, []).append(a)

    def add(self, node: Node, parents: list[str] | tuple[str, ...] = ()) -> None:
        self.nodes.append(node)
        self._by_name[node.name] = node
        for p in parents:
            if (p, node.name) not in self._parents.get(node.name, ()):
                self.edges.append((p, node.name))
                self._parents.setdefault(node.name, []).append(p)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def parents(self, name: str) -> list[str]:
        return list(self._parents.get(name, ()))

    def ancestors(self, *names: str) -> set[str]:
        """Every node that ``name`` (any of ``names``) depends on, not including
        the names themselves unless one depends on another."""
        seen: set[str] = set()
        stack = [p for name in names for p in self._parents.get(name, ())]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self._parents.get(n, ()))
        return seen

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes if n.kind == kind]

    def to_dot(self, name: str = "story") -> str:
        """The graph as Graphviz DOT text (``dot -Tsvg``), drawn as ``story.draw()``
        draws it: boxes for deterministic steps, ellipses for stochastic ones,
        hexagons for parameters, dashed parallelograms for inputs, diamonds for
        costs; edges follow the data, top-down."""
        shapes = {
            "deterministic": 'shape=box, style=filled, fillcolor="#dbe9f6", color="#2b5d8a"',
            "stochastic": 'shape=ellipse, style=filled, fillcolor="#fde2c8", color="#b35806"',
            "param": 'shape=hexagon, style=filled, fillcolor="#e6f5d0", color="#4d9221", fontname="Helvetica-Bold"',
            "input": 'shape=parallelogram, style="filled,dashed", fillcolor="#eeeeee", color="#666666"',
            "cost": 'shape=diamond, style=filled, fillcolor="#f8d0d0", color="#b2182b"',
        }

        def quote(text: str) -> str:
            return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [f"digraph {quote(name)} {{", "  rankdir=TB;", '  node [fontname="Helvetica"];']
        for n in self.nodes:
            where = f", tooltip={quote(f'line {n.line}')}" if n.line is not None else ""
            lines.append(f"  {quote(n.name)} [label={quote(n.name)}, {shapes.get(n.kind, 'shape=box')}{where}];")
        costs = [n.name for n in self.nodes if n.kind == "cost"]
        if len(costs) > 1:
            lines.append("  { rank=sink; " + " ".join(quote(c) for c in costs) + " }")
        for a, b in self.edges:
            lines.append(f"  {quote(a)} -> {quote(b)};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"Graph({len(self.nodes)} nodes, {len(self.edges)} edges)"
