"""docker-compose.yml builds one image for both of our services: the kvstore service and the
model worker name the same image beside the same build, so compose builds it once and both run
the same code (without ``image:`` compose builds and tags one image per service)."""

from __future__ import annotations

from test_compose import COMPOSE_FILE, _uses_our_image, load_compose


def test_both_services_run_one_image() -> None:
    services = load_compose(COMPOSE_FILE.read_text())["services"]
    ours = {name: s for name, s in services.items() if _uses_our_image(s)}
    assert set(ours) == {"kvstore", "worker"}
    images = {name: s.get("image") for name, s in ours.items()}
    assert all(images.values()), f"a service builds without naming its image: {images}"
    assert len(set(images.values())) == 1, images
    assert len({str(s["build"]) for s in ours.values()}) == 1

