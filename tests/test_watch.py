"""reload: {watch: true}: which files are watched, and when a change counts."""

import os

from poolport.server.watch import Settled, fingerprint, module_roots


def test_roots_are_found_without_importing(tmp_path):
    (tmp_path / "single.py").write_text("raise SystemExit('imported!')\n")
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise SystemExit('imported!')\n")
    (pkg / "sub" / "mod.py").write_text("")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.py").write_text("")
    roots = module_roots(["single", "pkg.sub.mod", "pkg", "nowhere_to_be_found"], [str(tmp_path)])
    assert roots == [str(tmp_path / "single.py"), str(pkg)]
    seen = fingerprint(roots)
    assert sorted(seen) == sorted([str(tmp_path / "single.py"), str(pkg / "__init__.py"), str(pkg / "sub" / "mod.py")])
    assert len(fingerprint(roots, limit=2)) == 2


def test_a_change_counts_once_it_held_still_for_one_more_look(tmp_path):
    path = tmp_path / "h.py"
    path.write_text("A = 1\n")
    roots = [str(path)]
    settled = Settled(fingerprint(roots))
    assert not settled.see(fingerprint(roots))
    path.write_text("A = 22\n")
    assert not settled.see(fingerprint(roots))  # just changed: may still be being written
    path.write_text("A = 333\n")
    assert not settled.see(fingerprint(roots))  # changed again
    assert settled.see(fingerprint(roots))  # held still: act
    assert not settled.see(fingerprint(roots))  # once
    os.unlink(path)
    assert not settled.see(fingerprint(roots))
    assert settled.see(fingerprint(roots))  # a deleted file is a change too
