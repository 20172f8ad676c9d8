import os

import pytest

from formats.backing import BackingPolicy, resolve
from formats.errors import UnsafeImage


def test_relative_backing_resolves_beside_the_child(tmp_path):
    (tmp_path / "base.img").write_bytes(b"")
    child = str(tmp_path / "child.img")
    assert resolve(child, "base.img", BackingPolicy()) == os.path.realpath(tmp_path / "base.img")


@pytest.mark.parametrize("name", ["../outside.img", "/etc/passwd", "sub/../../x"])
def test_escape_from_the_image_directory_is_refused(tmp_path, name):
    d = tmp_path / "images"
    d.mkdir()
    with pytest.raises(UnsafeImage, match="outside the allowed"):
        resolve(str(d / "child.img"), name, BackingPolicy())


def test_allowed_directory_admits_an_absolute_backing(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "base.img").write_bytes(b"")
    child = tmp_path / "vm" / "child.img"
    child.parent.mkdir()
    policy = BackingPolicy(dirs=(str(shared), str(child.parent)))
    assert resolve(str(child), str(shared / "base.img"), policy).endswith("base.img")


def test_self_reference_and_cycles_are_refused(tmp_path):
    child = str(tmp_path / "a.img")
    with pytest.raises(UnsafeImage, match="cycle"):
        resolve(child, "a.img", BackingPolicy())
    policy = BackingPolicy().descend(str(tmp_path / "b.img"))
    with pytest.raises(UnsafeImage, match="cycle"):
        resolve(child, "b.img", policy)


def test_disabled_backing_is_refused(tmp_path):
    with pytest.raises(UnsafeImage, match="disabled"):
        resolve(str(tmp_path / "a.img"), "b.img", BackingPolicy(allow=False))
