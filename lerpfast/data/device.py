"""Device-resident data: a whole MNIST/CIFAR-sized set held on the device as uint8, batched there.

Per batch the loader only indexes, augments and normalizes tensors that already live on the device:
no host work, no copies from the host (60,000 Fashion-MNIST images are 47 MB as uint8; CIFAR-10 train is
154 MB). The sample order and the augmentation parameters of epoch ``e`` come from a CPU
``torch.Generator`` seeded with ``(seed, e)`` and are moved to the device once per epoch, so

* an epoch's batches are identical on CPU and GPU, and
* a trainer resumes exactly with :meth:`DeviceLoader.iter_from` ``(epoch, batch)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DeviceLoader", "epoch_generator"]

_AUGMENTS = ("none", "flip", "crop_flip")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that draws epoch ``epoch``'s order and augmentation (same on every device)."""
    g = torch.Generator()
    # Mix seed and epoch so (seed, epoch) pairs never collide for seed, epoch < 2**31.
    g.manual_seed((int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77 + 0x165667B1) % (2**63))
    return g


class DeviceLoader:
    """Iterate ``(x, y)`` batches of a data set held whole on ``device``.

    Parameters
    ----------
    images : torch.Tensor or numpy.ndarray
        uint8 ``(N, C, H, W)``; copied to ``device`` once.
    labels : torch.Tensor or numpy.ndarray
        integer ``(N,)``.
    mean, std : sequence of float
        Per-channel normalization on the [0, 1] scale.
    max_value : int
        Raw value that maps to 1.0 (255, or 16 for scikit-learn digits).
    batch_size : int
        Samples per batch.
    shuffle : bool
        Draw a new random order each epoch (else the stored order).
    augment : {"none", "flip", "crop_flip"}
        Training augmentation done on the device: ``crop_flip`` is CIFAR's random crop of the image padded by
        ``pad`` zero pixels, then a horizontal flip with probability 1/2.
    pad : int
        Padding for ``crop_flip``.
    seed : int
        Seed of the order and augmentation; epoch ``e`` uses :func:`epoch_generator` ``(seed, e)``.
    drop_last : bool
        Drop the last incomplete batch.
    device : str or torch.device
        Where the data lives and batches are produced.
    dtype : torch.dtype
        dtype of ``x`` (float32 by default).
    channels_last : bool
        Return ``x`` in ``torch.channels_last`` memory format.
    name, split : str
        Recorded for sweeps' metadata.
    num_classes : int, optional
        Number of classes (default: ``labels.max() + 1``).

    Notes
    -----
    ``iter(loader)`` starts the next epoch (0, 1, 2, ...); :meth:`set_epoch` chooses it, and
    :meth:`iter_from` ``(epoch, batch)`` starts inside an epoch, yielding exactly the batches that an
    uninterrupted run would have yielded from that position on. After an epoch ends (or is abandoned)
    the next ``iter()`` continues with the following epoch.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        max_value: int = 255,
        batch_size: int = 1000,
        shuffle: bool = False,
        augment: str = "none",
        pad: int = 4,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        name: str = "",
        split: str = "",
        num_classes: int | None = None,
    ) -> None:
        if augment not in _AUGMENTS:
            raise ValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels).to(torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.to(self.device).contiguous()  # (N, C, H, W) uint8, resident
        self.labels = labels.to(self.device)  # (N,) int64, resident
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} channels, got {len(mean)}/{len(std)}")
        # x = raw * (1 / (max_value * std)) - mean / std: one fused multiply-add per element on the device.
        std_t = torch.tensor(std, dtype=torch.float64)
        self._scale = (1.0 / (max_value * std_t)).to(torch.float32).view(1, c, 1, 1).to(self.device)
        self._shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).to(torch.float32).view(1, c, 1, 1)
        self._shift = self._shift.to(self.device)
        self.mean, self.std, self.max_value = tuple(mean), tuple(std), max_value
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.pad = int(pad)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.dtype = dtype
        self.channels_last = channels_last
        self.name, self.split = name, split
        self.num_classes = int(num_classes) if num_classes is not None else int(labels.max().item()) + 1
        self.epoch = 0  # the epoch the next iter() yields

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Number of samples in the data set (``limit`` applied)."""
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __repr__(self) -> str:
        return (f"DeviceLoader({self.name!r}, split={self.split!r}, n={self.num_samples}, "
                f"batch_size={self.batch_size}, shuffle={self.shuffle}, augment={self.augment!r}, "
                f"device={str(self.device)!r}, epoch={self.epoch})")

    # -- iteration -------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch`` (its order and augmentation depend only on seed, epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(self.epoch, 0)

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """Order and augmentation parameters of ``epoch`` as device tensors.

        Returns
        -------
        dict
            ``order`` (N,) int64; with ``crop_flip``: ``dy``, ``dx`` (N,) offsets in ``[0, 2*pad]``; with
            ``flip``/``crop_flip``: ``flip`` (N,) bool. Entry ``i`` belongs to the ``i``-th sample of the epoch.
        """
        n = self.num_samples
        g = epoch_generator(self.seed, epoch)
        plan = {"order": torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)}
        if self.augment == "crop_flip":
            offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
            plan["dy"], plan["dx"] = offsets[0], offsets[1]
        if self.augment in ("flip", "crop_flip"):
            plan["flip"] = torch.rand(n, generator=g) < 0.5
        # One host->device copy per epoch (a few hundred kB), never per batch.
        return {k: v.to(self.device, non_blocking=True) for k, v in plan.items()}

    def iter_from(self, epoch: int, batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch`` starting at batch index ``batch`` (exact resume).

        Parameters
        ----------
        epoch : int
            Epoch number (0-based).
        batch : int
            First batch to yield, ``0 <= batch <= len(self)``.

        Yields
        ------
        x : torch.Tensor
            ``(B, C, H, W)`` normalized, ``self.dtype``, on ``self.device``.
        y : torch.Tensor
            ``(B,)`` int64 on ``self.device``.
        """
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch must be in [0, {len(self)}], got {batch}")
        self.epoch = int(epoch) + 1  # an abandoned or finished epoch is followed by the next one
        return self._generate(int(epoch), int(batch))

    def _generate(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.epoch_plan(epoch)
        n, b = self.num_samples, self.batch_size
        for i in range(start, len(self)):
            sl = slice(i * b, min((i + 1) * b, n))
            idx = plan["order"][sl]
            x = self.images.index_select(0, idx)  # (B, C, H, W) uint8
            if self.augment == "crop_flip":
                x = self._crop_flip(x, plan["dy"][sl], plan["dx"][sl], plan["flip"][sl])
            elif self.augment == "flip":
                x = torch.where(plan["flip"][sl].view(-1, 1, 1, 1), x.flip(3), x)
            yield self._normalize(x), self.labels.index_select(0, idx)

    def _crop_flip(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        # Random crop of the zero-padded image (torchvision RandomCrop(H, padding=pad) semantics) with the flip
        # folded into the column index: a single gather, (B, C, H, W) uint8 in and out.
        bsz, c, h, w = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
        rows = dy.view(-1, 1) + torch.arange(h, device=x.device)  # (B, H)
        cols = dx.view(-1, 1) + torch.arange(w, device=x.device)  # (B, W)
        cols = torch.where(flip.view(-1, 1), cols.flip(1), cols)
        bi = torch.arange(bsz, device=x.device).view(-1, 1, 1, 1)
        ci = torch.arange(c, device=x.device).view(1, -1, 1, 1)
        return xp[bi, ci, rows.view(bsz, 1, h, 1), cols.view(bsz, 1, 1, w)]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self._shift, x.to(torch.float32), self._scale)  # (B, C, H, W) float32
        if self.dtype != torch.float32:
            out = out.to(self.dtype)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out
