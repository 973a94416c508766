"""pytest-benchmark options for bench/ (run with: pytest bench/ --benchmark-only)."""


def pytest_addoption(parser):
    group = parser.getgroup("fastpref bench")
    group.addoption("--preset", default="h1024-v32k",
                    help="shape preset from bench/cases.py PRESETS (default h1024-v32k: N=4096, H=1024, V=32000)")
    group.addoption("--peakmem", action="store_true",
                    help="also measure each full step's peak extra memory in a fresh subprocess (extra_info)")
    group.addoption("--rounds", type=int, default=3, help="timed rounds per benchmark (default 3)")
