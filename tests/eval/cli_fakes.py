"""Stand-ins shared by the eval CLI tests (test_gen_cli.py, test_recon_cli.py)."""

NETWORKS = {}


def once(key, build):
    """Each network is built once per session: construction takes seconds here."""
    if key not in NETWORKS:
        NETWORKS[key] = build()
    return NETWORKS[key]


class FrechetRecorder:
    """Replaces frechet_distance: records the statistics it is given and returns a fixed value."""

    def __init__(self, value: float):
        self.value = value
        self.calls = []

    def __call__(self, mu1, sigma1, mu2, sigma2):
        self.calls.append((mu1, sigma1, mu2, sigma2))
        return self.value
