"""Plain-text tables of results.json rows."""


def _cell(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:g}"
    return "-" if v is None else str(v)


def markdown_table(rows, columns):
    """rows: dicts; columns: (header, key) pairs. Returns a Markdown table as a string."""
    cells = [[_cell(r.get(key)) for _, key in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _) in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line([h for h, _ in columns]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)
