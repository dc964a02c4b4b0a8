"""`bench export` / `bench import`: a table's done cells carried to another store count there as
done, import never replaces a cell, and a foreign or hostile archive is refused in one line."""

import io
import tarfile

from tests.test_cli import bench


def _one_done_cell(home):
    from core.config import load_config
    from bench.worker import run_cell
    from tests.conftest import TINY

    cfg = load_config("demo", TINY + ["data.ratio=1", "data.fold=1", "lsm.enabled=false"], method="ubteacher")
    return run_cell(cfg, home, track=False, progress=False)


def test_exported_cells_are_done_in_the_importing_store(tmp_path):
    from tests.conftest import TINY
    from tests.test_runner import MINI

    first, second = tmp_path / "first", tmp_path / "second"
    result = _one_done_cell(first)
    table = [str(MINI), "--seeds", "1", "--ratios", "1,5", *TINY]
    archive = tmp_path / "cells.tar.gz"
    out = bench("export", *table, "--out", str(archive), home=first)
    assert out.returncode == 0, out.stderr
    assert "1 of 6 cells of mini written" in out.stdout
    with tarfile.open(archive) as tar:  # configs, results and logs; never weights
        names = tar.getnames()
    assert not any(n.endswith(".pth") for n in names) and any(n.endswith("metrics.jsonl") for n in names)

    out = bench("import", str(archive), home=second)
    assert out.returncode == 0, out.stderr
    assert "1 cells added" in out.stdout
    rel = f"runs/{result['key'][:2]}/{result['key']}/result.json"
    assert (second / rel).read_bytes() == (first / rel).read_bytes()
    plan = bench("plan", *table, home=second)
    lines = [line for line in plan.stdout.splitlines() if "coco_standard" in line]
    assert sum("done" in line for line in lines) == 1

    # a second import keeps what the store has
    (second / rel).write_text((second / rel).read_text().replace('"ubteacher"', '"ubteacher" '))
    kept = (second / rel).read_text()
    out = bench("import", str(archive), home=second)
    assert out.returncode == 0 and "0 cells added" in out.stdout and "1 already there" in out.stdout
    assert (second / rel).read_text() == kept

    # an export never overwrites
    out = bench("export", *table, "--out", str(archive), home=first)
    assert out.returncode == 2 and "exists; choose another --out" in out.stderr


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_foreign_archives_are_refused_in_one_line(tmp_path):
    home = tmp_path / "home"
    not_tar = tmp_path / "x.tar.gz"
    not_tar.write_text("hello")
    no_manifest = tmp_path / "y.tar.gz"
    _tar(no_manifest, {"runs/ab/abcd/result.json": b"{}"})
    escaping = tmp_path / "z.tar.gz"
    _tar(escaping, {"lsm-bench-cells.json": b"{}", "runs/ab/../../../evil/result.json": b"{}"})
    dotted = tmp_path / "w.tar.gz"
    _tar(dotted, {"lsm-bench-cells.json": b"{}", "runs/../../result.json": b"{}"})
    cases = [(dotted, "unexpected member"), (tmp_path / "missing.tar.gz", "does not exist"), (not_tar, "is not a gzipped tar archive"),
             (no_manifest, "was not written by `bench export`"), (escaping, "unexpected member")]
    for archive, message in cases:
        out = bench("import", str(archive), home=home)
        assert out.returncode == 2, (archive, out.stdout)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "evil").exists() and not (home / "runs").exists()


def test_a_truncated_or_damaged_archive_is_refused_and_nothing_is_imported(tmp_path):
    """A gzip CRC covers the whole stream; tarfile alone stops before it and would import a changed
    byte as a changed result."""
    home = tmp_path / "home"
    key = "ab" + "0" * 62
    good = tmp_path / "good.tar.gz"
    _tar(good, {"lsm-bench-cells.json": b"{}", f"runs/ab/{key}/result.json": b'{"AP": 31.7754}' * 50})
    data = good.read_bytes()
    truncated, damaged = tmp_path / "cut.tar.gz", tmp_path / "crc.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-8] ^= 0xFF  # the CRC-32 of the trailer: the data itself decompresses
    damaged.write_bytes(bytes(flipped))
    for archive in (truncated, damaged):
        out = bench("import", str(archive), home=home)
        assert out.returncode == 2, (archive, out.stdout, out.stderr)
        assert "is truncated or damaged" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not (home / "runs").exists()
    out = bench("import", str(good), home=home)
    assert out.returncode == 0 and "1 cells added" in out.stdout, out.stderr
