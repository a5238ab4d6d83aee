"""Errors raised by wna16moe. Every message names the tensor or setting at fault, what was expected
and what arrived."""


class WNA16MoEError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointError(WNA16MoEError, ValueError):
    """A checkpoint is missing a tensor, or holds one of the wrong shape, dtype or value."""

    def __init__(self, checkpoint: str, tensor: str, problem: str) -> None:
        self.checkpoint = checkpoint
        self.tensor = tensor
        self.problem = problem
        super().__init__(f"{checkpoint}: tensor '{tensor}': {problem}")


class UnsupportedError(WNA16MoEError, ValueError):
    """A setting (bits, group size, format, activation, ...) that this library does not support."""


class InvalidInputError(WNA16MoEError, ValueError):
    """A tensor given to a public function has the wrong shape, dtype, device or values."""


class BackendError(WNA16MoEError, RuntimeError):
    """A backend was requested (or is needed) that cannot run this layer on this device."""


def no_gradients(module: str) -> UnsupportedError:
    """The error a backward through `module` raises: its kernels run outside autograd on frozen quantized
    weights, so it has no gradient to give its inputs."""
    return UnsupportedError(f"{module} computes no gradients: its experts are frozen quantized weights and its "
                            "kernels run outside autograd (inference only). Run it under torch.no_grad() or "
                            "torch.inference_mode(); a loss that must reach layers before it cannot go through it")
