"""D-RISE (and RISE): a map from the scores of randomly masked copies of the image.

No gradients and no feature layer: the model is a black box. Masks are drawn from a seeded
generator, applied in chunks of ``batch_size`` images through one reused buffer, under
``torch.inference_mode``: peak memory is that of one chunk, whatever ``n_masks``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.errors import ConfigError
from camlens.methods.base import CAMMethod, LayerSpec, Step
from camlens.models.outputs import select_logits


class DRISE(CAMMethod):
    """D-RISE for detectors, RISE for classifiers: the mean of random masks weighted by the
    target's score on the masked image.

    ::

        m_i    = crop(U(b_i), dy_i, dx_i)        b_i: (s x s) cells, each 1 with probability p;
                                                 U: bilinear upsampling to (s + 1) cells of
                                                 ceil(H / s) x ceil(W / s) px; random shift
        w_ik   = f_k(x * m_i)                    the score of target k on the masked image
        M_k    = sum_i w_ik m_i / (n p)          (N, K, H, W): at the input's resolution

    For a detector (``camlens.models.dense.DetectionScores`` in ``"drise"`` mode) the score
    is D-RISE's similarity of the target detection ``d_t`` with the masked image's
    detections ``d_j``: ``max_j IoU(L_t, L_j) O_j cos(P_t, P_j)``. torchvision's detectors
    report a class and a score per box, not the class probability vector, so ``P_j`` is the
    one-hot class times ``O_j = s_j`` (the score): ``cos(P_t, P_j) = [c_j = c_t]`` and
    the similarity is ``max over same-class detections of IoU(L_t, L_j) s_j``. For a
    classifier (RISE) the score is the softmax probability of the class; for any other
    score model (``outputs_are_scores``: a segmenter's region score) the score itself.

    Seeded (``seed``): the same masks for the same input size, on every call.

    Petsiuk, Jain, Manjunatha, Morariu, Mehra, Ordonez, Saenko, "Black-box Explanation of
    Object Detectors via Saliency Maps", CVPR 2021; Petsiuk, Das, Saenko, "RISE: Randomized
    Input Sampling for Explanation of Black-box Models", BMVC 2018.

    Parameters:
        module, layer, ...: as for every ``CAMMethod`` (the layer is not used for the map).
        n_masks: the number of random masks (D-RISE used 5,000; 1,000 by default here).
        grid: cells per side of a mask (``s``; 16 by default, as D-RISE).
        probability: the chance a cell is kept (``p``; 0.5).
        batch_size: masked images per forward pass.
        seed: the seed of the masks.
    """

    name = "drise"
    #: ``camlens.models.dense.DetectionScores`` mode that gives D-RISE's similarity.
    detection_score = "drise"

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        n_masks: int = 1000,
        grid: int = 16,
        probability: float = 0.5,
        batch_size: int = 32,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(module, layer, **options)
        if n_masks < 1 or grid < 1 or batch_size < 1 or not 0.0 < probability <= 1.0:
            raise ConfigError(
                f"drise needs n_masks >= 1, grid >= 1, batch_size >= 1 and 0 < probability "
                f"<= 1, got n_masks={n_masks}, grid={grid}, batch_size={batch_size}, "
                f"probability={probability}"
            )
        self.n_masks = n_masks
        self.grid = grid
        self.probability = probability
        self.batch_size = batch_size
        self.seed = seed

    def masks(self, start: int, count: int, size: tuple[int, int]) -> torch.Tensor:
        """(count, 1, H, W) float32 masks ``start .. start + count`` of the seeded sequence."""
        height, width = size
        cell_h, cell_w = -(-height // self.grid), -(-width // self.grid)
        generator = torch.Generator().manual_seed(self.seed)
        cells = torch.rand((self.n_masks, 1, self.grid, self.grid), generator=generator)
        shifts = torch.randint(0, cell_h * cell_w, (self.n_masks,), generator=generator)
        grids = (cells[start : start + count] < self.probability).float()
        big = (self.grid + 1) * cell_h, (self.grid + 1) * cell_w
        upsampled = F.interpolate(grids, size=big, mode="bilinear", align_corners=False)
        out = upsampled.new_empty((count, 1, height, width))
        for i, shift in enumerate(shifts[start : start + count].tolist()):
            dy, dx = divmod(shift, cell_w)
            out[i] = upsampled[i, :, dy : dy + height, dx : dx + width]
        return out

    def compute_raw(self, step: Step) -> torch.Tensor:
        x, targets = step.x, step.targets
        size = (int(x.shape[-2]), int(x.shape[-1]))
        n, k = targets.shape
        raw = torch.zeros((n, k, *size), dtype=torch.float32, device=x.device)
        with torch.inference_mode():
            buffer = x.new_empty((min(self.batch_size, self.n_masks), *x.shape[1:]))
            for start in range(0, self.n_masks, self.batch_size):
                count = min(self.batch_size, self.n_masks - start)
                masks = self.masks(start, count, size).to(device=x.device)
                for image in range(n):
                    inputs = buffer[:count].copy_(x[image].expand(count, *x.shape[1:]))
                    scores = self._scores(inputs.mul_(masks.to(x.dtype)), targets[image])
                    raw[image] += torch.einsum("bk,bhw->khw", scores, masks[:, 0])
        return raw / (self.n_masks * self.probability)

    def _scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 scores of the targets on masked copies of one image."""
        output = select_logits(self.module(inputs), self.output).float()
        if not getattr(self.module, "outputs_are_scores", False):
            output = output.softmax(dim=1)
        return output[:, targets]
