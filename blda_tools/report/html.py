"""A tiny builder for self-contained HTML reports: one file, images embedded, no scripts.

    report = Report("Diagnosis of model X")
    report.heading("Per-class results")
    report.table(["class", "IoU", "Bias"], rows, number_format={"IoU": ".1%"}, signed_columns=["Bias"])
    report.image("bias.png", "Bias per class (Eq. 4)")
    report.save("out/report.html")

All text is HTML-escaped, so class names or file names can never inject markup.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from blda_tools.errors import BLDAError
from blda_tools.fileio import as_text, atomic_output

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "n/a"

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #ffffff; line-height: 1.5; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
h3 { font-size: 1.1rem; margin-top: 1.6rem; }
p { max-width: 75ch; }
.table-wrap { max-height: 75vh; overflow: auto; border: 1px solid #d0d7de; border-radius: 6px;
              margin: 1rem 0; }
table { border-collapse: collapse; font-size: .9rem; width: 100%; }
th, td { padding: .35rem .7rem; border-bottom: 1px solid #eaeef2; white-space: nowrap; }
th { position: sticky; top: 0; background: #f6f8fa; text-align: left; font-weight: 600;
     box-shadow: inset 0 -1px 0 #d0d7de; }
tbody tr:nth-child(even) { background: #f9fafb; }
tbody tr:hover { background: #eef4fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #8c959f; }
td.good { color: #116329; font-weight: 600; }
td.bad { color: #b3261e; font-weight: 600; }
caption { caption-side: top; text-align: left; padding: .5rem .7rem; color: #57606a; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; border-radius: 4px; }
figcaption { color: #57606a; font-size: .9rem; margin-top: .3rem; }
.note { border-left: 4px solid; border-radius: 4px; padding: .6rem .9rem; margin: 1rem 0; }
.note.info { border-color: #0969da; background: #ddf4ff; }
.note.warning { border-color: #bf8700; background: #fff8c5; }
dl.definitions { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dl.definitions dt { font-weight: 600; }
dl.definitions dd { margin: 0; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: .6rem .9rem;
      overflow-x: auto; }
"""

NOTE_KINDS = ("info", "warning")


class Report:
    """An HTML report assembled block by block and saved as one self-contained file."""

    def __init__(self, title: str) -> None:
        self.title = str(title)
        self._blocks: list[str] = []

    def heading(self, text: str, level: int = 2) -> Report:
        """A section heading (level 2 or 3; level 1 is the report title)."""
        if level not in (2, 3):
            raise BLDAError(f"heading level: expected 2 or 3, got {level!r}")
        self._blocks.append(f"<h{level}>{_escape(text)}</h{level}>")
        return self

    def paragraph(self, text: str) -> Report:
        """A paragraph of plain text."""
        self._blocks.append(f"<p>{_escape(text)}</p>")
        return self

    def note(self, text: str, kind: str = "info") -> Report:
        """A highlighted box; `kind="warning"` for things the reader must not miss."""
        if kind not in NOTE_KINDS:
            raise BLDAError(f"note kind: expected one of {NOTE_KINDS}, got {kind!r}")
        label = "<strong>Warning:</strong> " if kind == "warning" else ""
        self._blocks.append(f'<div class="note {kind}">{label}{_escape(text)}</div>')
        return self

    def definitions(self, items: Iterable[tuple[str, str]]) -> Report:
        """A list of terms, each explained in one line (e.g. what a table's columns mean)."""
        rows = "".join(f"<dt>{_escape(term)}</dt><dd>{_escape(text)}</dd>" for term, text in items)
        self._blocks.append(f'<dl class="definitions">{rows}</dl>')
        return self

    def command(self, text: str) -> Report:
        """A shell command to copy, shown verbatim."""
        self._blocks.append(f"<pre><code>{_escape(text)}</code></pre>")
        return self

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[object]],
        number_format: str | Mapping[str, str] = ".3f",
        *,
        signed_columns: Iterable[str] = (),
        higher_is_better: bool = True,
        caption: str | None = None,
    ) -> Report:
        """A table; numbers are right-aligned and NaN or None is shown as "n/a".

        `number_format` is a format spec for floats (".3f", ".1%", ...) or a mapping column ->
        spec (columns not in it use ".3f"); integers are written with thousands separators unless
        their column has a spec. Cells of `signed_columns` get an explicit sign and are coloured
        green when the change is good and red when bad (`higher_is_better` says which sign).
        """
        columns = [str(column) for column in columns]
        signed = set(signed_columns)
        unknown = signed - set(columns)
        if unknown:
            raise BLDAError(
                f"table signed_columns: {sorted(unknown)} are not among the columns {columns}"
            )
        formats = dict(number_format) if isinstance(number_format, Mapping) else {}
        default = ".3f" if isinstance(number_format, Mapping) else number_format
        header = "".join(f"<th>{_escape(column)}</th>" for column in columns)
        body = []
        for index, row in enumerate(rows):
            row = list(row)
            if len(row) != len(columns):
                raise BLDAError(f"table row {index}: expected {len(columns)} cells, got {len(row)}")
            cells = []
            for column, value in zip(columns, row, strict=True):
                spec = formats.get(column)
                try:
                    cells.append(_cell(value, spec, default, column in signed, higher_is_better))
                except ValueError:
                    raise BLDAError(
                        f"table column {column!r}: format {spec or default!r} cannot format {value!r}"
                    ) from None
            body.append("<tr>" + "".join(cells) + "</tr>")
        caption_html = f"<caption>{_escape(caption)}</caption>" if caption else ""
        self._blocks.append(
            f'<div class="table-wrap"><table>{caption_html}<thead><tr>{header}</tr></thead>'
            f"<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>"
        )
        return self

    def image(self, png_path: str | Path, caption: str = "") -> Report:
        """Embed a PNG file as a base64 data URI, so the report stays a single file."""
        png_path = Path(png_path)
        try:
            data = png_path.read_bytes()
        except OSError as error:
            raise BLDAError(f"{png_path}: cannot read image ({error.strerror})") from None
        if not data.startswith(PNG_SIGNATURE):
            raise BLDAError(f"{png_path}: not a PNG file (expected the PNG signature)")
        encoded = base64.b64encode(data).decode("ascii")
        alt = _escape(caption or png_path.name)
        caption_html = f"<figcaption>{_escape(caption)}</figcaption>" if caption else ""
        self._blocks.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{alt}">{caption_html}</figure>'
        )
        return self

    def to_html(self) -> str:
        """The whole document as a string."""
        title = _escape(self.title)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n<main>\n<h1>{title}</h1>\n"
            + "\n".join(self._blocks)
            + "\n</main>\n</body>\n</html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write the report atomically as UTF-8 and return its path."""
        path = Path(path)
        with atomic_output(path) as temporary:
            temporary.write_text(as_text(self.to_html()), encoding="utf-8")
        return path


def format_value(value: object, spec: str | None = None, default: str = ".3f") -> str:
    """Text of one table cell: "n/a" for None / NaN, integers with separators, floats by spec."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return format(int(value), spec or ",")
    value = float(value)
    if math.isnan(value):
        return MISSING
    return without_negative_zero(format(value, spec or default))


def without_negative_zero(text: str) -> str:
    """A formatted number that rounds to zero, unsigned: "-0.0" and "+0.00%" become "0.0" and
    "0.00%" (a sign there would claim a direction the shown digits do not have)."""
    if text[:1] in "+-" and not any(digit in text for digit in "123456789"):
        return text[1:]
    return text


def ordinal(number: int) -> str:
    """1 -> "1st", 2 -> "2nd", 3 -> "3rd", 4 -> "4th", 11 -> "11th", 22 -> "22nd"."""
    if 10 <= number % 100 <= 20:
        return f"{number}th"
    return f"{number}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(number % 10, 'th') }"


def _cell(
    value: object, spec: str | None, default: str, signed: bool, higher_is_better: bool
) -> str:
    numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if value is None or (numeric and math.isnan(float(value))):
        return f'<td class="num missing">{MISSING}</td>'
    if not numeric:
        return f"<td>{_escape(value)}</td>"
    classes = "num"
    text = format_value(value, spec, default)
    if signed and text.lstrip("+-") != format_value(0 * value, spec, default).lstrip("+-"):
        # Coloured only when the shown digits differ from zero: a change that rounds to 0.0
        # is neither good nor bad.
        classes += " good" if (float(value) > 0) == higher_is_better else " bad"
        # The sign is written out so the meaning does not rely on colour alone.
        spec = spec or ("," if isinstance(value, numbers.Integral) else default)
        text = format_value(value, spec if spec.startswith("+") else "+" + spec, default)
    return f'<td class="{classes}">{_escape(text)}</td>'


def _escape(text: object) -> str:
    return html.escape(str(text), quote=True)
