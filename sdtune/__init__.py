"""sdtune: parameter-efficient fine-tuning of Stable Diffusion v1.x.

Heavy libraries (torch, diffusers) are imported only when a function that needs them is called,
so `import sdtune` and `sdtune --help` stay fast. The loop and the sampler live in `training`
and `sampling` so that `sdtune.train` and `sdtune.sample` stay the functions below.
"""

__version__ = "0.1.0"

__all__ = ["train", "sample", "load_adapter", "__version__"]


def train(config):
    """Train an adapter as `config` (a `sdtune.config.TrainConfig`) says; returns a `Run`."""
    from .training import train as _train

    return _train(config)


def sample(config):
    """Draw images and a grid as `config` (a `sdtune.config.SampleConfig`) says."""
    from .sampling import sample as _sample

    return _sample(config)


def load_adapter(path, pipeline, merge: bool = True):
    """Load an sdtune adapter file or run folder into `pipeline`'s UNet; returns the method.

    A kohya-format file (LoRA, LoHa, LoKr, full-weight diffs, from any trainer) is added to the
    base weights instead (always merged)."""
    from .adapter import load_adapter as _load

    return _load(path, pipeline, merge=merge)
