"""Images for papers and issues (Pillow): a heat-coloured sequence, a norm histogram."""

from __future__ import annotations

from pathlib import Path

from vaultsh.errors import UserError

WIDTH = 900
PAD = 8


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise UserError("--png needs Pillow: pip install pillow") from None
    return Image, ImageDraw, ImageFont


def _font(ImageFont):
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def _save(img, path: str | Path) -> tuple[int, int]:
    p = Path(path).expanduser()
    if p.parent and not p.parent.exists():
        raise UserError(f"--png {path}: no such directory {p.parent}")
    img.save(p, format="PNG")
    return img.size


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else " " for c in s.replace("\n", "\\n"))


def heat_png(result, path: str | Path) -> tuple[int, int]:
    """Draw `result` (a HeatResult): token boxes in their colours, wrapped to WIDTH; returns (w, h)."""
    Image, ImageDraw, ImageFont = _pil()
    font = _font(ImageFont)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag|", font=font)[3]) + 6
    boxes, x, y = [], PAD, PAD + line_h  # first line: the title
    for tok, rgb in zip(result.tokens, result.colours()):
        text = _printable(tok.piece) or " "
        w = int(probe.textlength(text, font=font)) + 2
        if x + w > WIDTH - PAD and x > PAD:
            x, y = PAD, y + line_h
        boxes.append((x, y, w, rgb, text))
        x += w
    height = y + line_h + PAD
    img = Image.new("RGB", (WIDTH, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    title = f"{_printable(result.value)}  scale {result.scale:.4g}  {_printable(result.file)} #{result.sequence}"
    draw.text((PAD, PAD), title, fill=(0, 0, 0), font=font)
    for bx, by, w, rgb, text in boxes:
        draw.rectangle([bx, by, bx + w - 1, by + line_h - 2], fill=rgb)
        draw.text((bx + 1, by + 2), text, fill=(0, 0, 0), font=font)
    return _save(img, path)


def histogram_png(
    edges: list[float], counts: list[int], by_position: list, title: str, path: str | Path
) -> tuple[int, int]:
    """Two panels: token-norm histogram (log-spaced bins) and mean norm by position; returns (w, h)."""
    Image, ImageDraw, ImageFont = _pil()
    font = _font(ImageFont)
    w, panel = 640, 200
    img = Image.new("RGB", (w, 2 * panel + 4 * PAD + 40), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((PAD, PAD), _printable(title), fill=(0, 0, 0), font=font)

    def bars(values: list[float], top: int, label: str):
        vals = [v or 0.0 for v in values]
        peak = max(vals) or 1.0
        bw = max(1, (w - 2 * PAD) // max(1, len(vals)))
        base = top + panel
        draw.text((PAD, top), label, fill=(0, 0, 0), font=font)
        for i, v in enumerate(vals):
            h = int((panel - 24) * v / peak)
            draw.rectangle([PAD + i * bw, base - h, PAD + (i + 1) * bw - 2, base], fill=(200, 40, 40))

    bars([float(c) for c in counts], PAD + 20, f"token norms: {edges[0]:.3g} .. {edges[-1]:.3g} (log bins)")
    bars([v for v in by_position], 2 * PAD + 20 + panel, "mean norm by position")
    return _save(img, path)
