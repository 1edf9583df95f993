"""mmengine's image data preprocessor, extended to batches of volumes."""
import torch
from mmengine.model import ImgDataPreprocessor


class VolumeDataPreprocessor(ImgDataPreprocessor):
    """``ImgDataPreprocessor`` for volumes: (C, D, H, W) samples or an (N, C, D, H, W) batch.

    ``mean``/``std`` take one value per channel (1 or 3); leave ``bgr_to_rgb`` off. The
    per-sample path of ``ImgDataPreprocessor`` already normalizes and stacks any rank, but
    its stacked-tensor path insists on 4D, so a stacked 5D batch goes through the former.
    """

    def forward(self, data: dict, training: bool = False) -> dict:
        inputs = data.get('inputs')
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 5:
            data = {**data, 'inputs': list(inputs)}
        return super().forward(data, training)
