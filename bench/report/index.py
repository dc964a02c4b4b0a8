"""`results/index.html`: one page linking every published table and figure with its provenance.

`bench report --all` writes it (and `bench report TABLE` / `bench run` refresh it where one is
there). Nothing is recomputed: the page reads what each file records about itself.

- a table (`<name>.md` with `.csv`, `.tex`, `.html` beside it): the header comment lines
  `bench report` writes (command, git_sha, preset, timestamp);
- a figure (`<stem>.png`, usually with `<stem>_data.csv`): the CSV's comment lines (`# command:`,
  and git_sha, preset, timestamp where the figure writes them), the PNG's own metadata otherwise;
- any other file (notes, measurements): its leading comment lines, if any.

Where a file records no commit or date, the page gives the git commit that last changed the file,
marked as such. The page holds no clock reading: regenerating it over the same files gives the
same page.
"""

from __future__ import annotations

import html
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

INDEX = "index.html"
TABLE_FORMATS = (".md", ".html", ".csv", ".tex")
_COMMENT = (re.compile(r"^\s*<!--\s*([A-Za-z_][\w ]*?)\s*:\s*(.*?)\s*-->\s*$"),  # md, html
            re.compile(r"^\s*#\s*([A-Za-z_]\w*)\s*:\s*(.*?)\s*$"),  # csv
            re.compile(r"^\s*%\s*([A-Za-z_]\w*)\s*:\s*(.*?)\s*$"))  # tex
_ANY_COMMENT = re.compile(r"^\s*(<!--.*-->|#.*|%.*)\s*$")
_SKIP = {".pyc"}


@dataclass
class Entry:
    kind: str  # table | figure | file
    name: str
    title: str
    files: list[Path]  # relative to the results folder; the first is the one to open
    meta: dict[str, str] = field(default_factory=dict)
    from_git: set[str] = field(default_factory=set)  # meta keys filled in from git, not the file


def header(path: Path, limit: int = 40) -> dict[str, str]:
    """The `key: value` comment lines at the top of a text file (first value of a key wins)."""
    out: dict[str, str] = {}
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if i >= limit or (line.strip() and not _ANY_COMMENT.match(line)):
                    break
                for rx in _COMMENT:
                    if m := rx.match(line):
                        out.setdefault(m.group(1).strip().lower(), m.group(2))
                        break
    except OSError:
        pass
    return out


def png_metadata(path: Path) -> dict[str, str]:
    try:
        from PIL import Image

        with Image.open(path) as img:
            info = dict(img.info)
    except Exception:  # an unreadable PNG is still listed
        return {}
    return {"command": str(info["Description"])} if info.get("Description") else {}


def preset_of(command: str) -> str | None:
    """`--preset X` (or `--preset=X`) in a recorded command."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for i, w in enumerate(words):
        if w == "--preset" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--preset="):
            return w.split("=", 1)[1]
    return None


def _git_last_commit(path: Path) -> tuple[str, str] | None:
    """(short sha, commit date) of the last commit that changed `path`, if it is in a git work tree."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.stdout.split()
    return (parts[0], parts[1]) if out.returncode == 0 and len(parts) == 2 else None


def _title(md: Path) -> str:
    for line in md.read_text(encoding="utf-8", errors="replace").splitlines()[:40]:
        if line.startswith("#") and not line.startswith("#### "):
            return line.lstrip("#").strip().replace("\\", "")
    return ""


def collect(results: Path) -> dict[str, list[Entry]]:
    """Entries by folder (relative path, '' for the results folder itself), in name order."""
    results = Path(results)
    files = sorted(p for p in results.rglob("*") if p.is_file() and not any(part.startswith(".")
                   for part in p.relative_to(results).parts) and p.suffix not in _SKIP)
    files = [p for p in files if p.relative_to(results).as_posix() != INDEX]
    claimed: set[Path] = set()
    entries: list[tuple[Path, Entry]] = []
    for p in files:  # tables: <name>.md with a recorded command
        if p.suffix == ".md" and "command" in (meta := header(p)) and any(
                p.with_suffix(s).exists() for s in TABLE_FORMATS if s != ".md"):
            group = [p.with_suffix(s) for s in TABLE_FORMATS if p.with_suffix(s).exists()]
            claimed.update(group)
            entries.append((p, Entry("table", p.stem, _title(p), [g.relative_to(results) for g in group], meta)))
    for p in files:  # figures: <stem>.png and <stem>_data.csv
        if p.suffix.lower() == ".png" and p not in claimed:
            data = p.with_name(p.stem + "_data.csv")
            group = [p] + ([data] if data.exists() else [])
            claimed.update(group)
            meta = {**png_metadata(p), **(header(data) if data.exists() else {})}
            entries.append((p, Entry("figure", p.stem, "", [g.relative_to(results) for g in group], meta)))
    for p in files:
        if p not in claimed:
            entries.append((p, Entry("file", p.name, "", [p.relative_to(results)], header(p))))
    by_folder: dict[str, list[Entry]] = {}
    for p, e in sorted(entries, key=lambda pe: (pe[0].parent.relative_to(results).as_posix(),
                                                ("table", "figure", "file").index(pe[1].kind), pe[1].name)):
        if "preset" not in e.meta and (preset := preset_of(e.meta.get("command", ""))):
            e.meta["preset"] = preset
        if "git_sha" not in e.meta or "timestamp" not in e.meta:
            if (found := _git_last_commit(p)) is not None:
                for key, value in zip(("git_sha", "timestamp"), found):
                    if key not in e.meta:
                        e.meta[key] = value
                        e.from_git.add(key)
        folder = p.parent.relative_to(results).as_posix()
        by_folder.setdefault("" if folder == "." else folder, []).append(e)
    return by_folder


_CSS = """body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; width: 100%; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.4em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
code { font-size: 0.9em; overflow-wrap: anywhere; }
img { max-width: 320px; max-height: 200px; border: 1px solid #ddd; }
.git { color: #777; }"""


def render(results: Path, command: str) -> str:
    esc = html.escape
    by_folder = collect(results)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           "<title>lsm-bench results</title>", f"<style>\n{_CSS}\n</style>", "</head>", "<body>",
           "<h1>lsm-bench results</h1>",
           f"<p>Every table and figure in this folder, with the command that made it, the preset, the commit and "
           f"the date each file records. Regenerated by <code>{esc(command)}</code>. "
           f'<span class="git">Grey: the file records none; the git commit that last changed it.</span></p>']
    if not by_folder:
        out.append("<p>No tables or figures yet: <code>bench run TABLE</code> writes them here.</p>")
    for folder, entries in by_folder.items():
        out.append(f"<h2 id=\"{esc(folder or 'results')}\">{esc(folder + '/' if folder else 'results/')}</h2>")
        out += ['<table class="artifacts">', "<thead><tr><th>Kind</th><th>Name</th><th>Files</th><th>Command</th>"
                "<th>Preset</th><th>Commit</th><th>Date</th></tr></thead>", "<tbody>"]
        for e in entries:
            links = " ".join(f'<a href="{esc(f.as_posix())}">{esc(f.suffix.lstrip(".") if e.kind == "table" else f.name)}</a>'
                             for f in e.files)
            name = f"<b>{esc(e.name)}</b>" + (f"<br>{esc(e.title)}" if e.title else "")
            if e.kind == "figure":
                name += f'<br><a href="{esc(e.files[0].as_posix())}"><img src="{esc(e.files[0].as_posix())}" ' \
                        f'alt="{esc(e.name)}" loading="lazy"></a>'

            def cell(key: str, e: Entry = e) -> str:
                value = e.meta.get(key, "")
                if not value:
                    return "<td>—</td>"
                if key in e.from_git:
                    return f'<td class="git" title="from git: the last commit of the file">{esc(value)}</td>'
                return f"<td>{esc(value)}</td>"

            command_text = e.meta.get("command", "")
            out.append(f'<tr class="{e.kind}" data-name="{esc(e.name)}"><td>{e.kind}</td><td>{name}</td>'
                       f"<td>{links}</td><td>{'<code>' + esc(command_text) + '</code>' if command_text else '—'}</td>"
                       f"{cell('preset')}{cell('git_sha')}{cell('timestamp')}</tr>")
        out += ["</tbody>", "</table>"]
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def write_index(results: Path, command: str = "bench report --all") -> Path:
    """Write `<results>/index.html` atomically; its path."""
    from bench.report.tables import _write_atomic

    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / INDEX
    _write_atomic(path, render(results, command))
    return path
