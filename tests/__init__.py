"""The test suite, a package so that tests share helpers as `from tests.conftest import ...` (pytest puts the
repository root on the import path for it)."""
