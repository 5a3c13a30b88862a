"""Helpers, corpora and golden files shared by the test suites (no tests here).

- ``markers``: skip markers (``needs_root``, ``needs_umoci``, ``needs_skopeo``) and ``IS_ROOT``;
- ``paths``: ``REPO`` (the checkout) and ``GOLDEN`` (``golden/``, the expected outputs);
- ``imagebuild``, ``tarbuild``, ``hostile_corpus``: images, layers and hostile tars;
- ``containerd_util``: the snapshotter server, a private containerd, ``ctr``, teardown;
- ``snapshotter_suite``, ``snapshotter_client``: the snapshotter behaviours bound to both the
  Python API and the gRPC service, and the client that gives the service that API.
"""

import pkgutil

import pytest

# Asserts in these modules are test assertions (the shared snapshotter suite holds tests):
# pytest rewrites them like a test module's, for the same failure reports.
pytest.register_assert_rewrite(*(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)))
