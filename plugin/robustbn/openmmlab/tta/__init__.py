from .adapter import Adapter
from .loop import TestTimeAdaptLoop
from .methods import DEFAULT_OPTIMIZERS, METHODS, configure_model, entropy_sum, norm_affine_params

__all__ = ['Adapter', 'TestTimeAdaptLoop', 'DEFAULT_OPTIMIZERS', 'METHODS',
           'configure_model', 'entropy_sum', 'norm_affine_params']
