"""Build the test suite's base images before any server starts: `make test` runs this.

Why: a test server builds a missing image inside its own start, bounded by the start's
timeout; on a fresh, loaded machine a debootstrap alone took 15 minutes (CI run 201 of
issue 6 lost a module's server to that). Built here first, with no timeout but
debootstrap's own, every server start only finds the images.
"""

from __future__ import annotations

import sys
import time

from tests.framework.server import IMAGES_DIR


def main() -> None:
    from wisp.images import ImageStore

    store = ImageStore(IMAGES_DIR)
    for name, build in (("busybox", store.build_busybox), ("debian", store.build_debian)):
        if store.latest(name) is not None:
            continue
        print(f"building test image {name} in {IMAGES_DIR}…", file=sys.stderr, flush=True)
        started = time.monotonic()
        build(name)
        print(f"test image {name} built in {time.monotonic() - started:.0f} s",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
