"""Warning filters that must be in place before torch is imported."""

import warnings

# nvidia-resiliency-ext pulls in the pynvml shim, and torch warns about it on import even
# on machines without a GPU: noise in every memckpt command and worker, nothing to act on.
warnings.filterwarnings(
    "ignore", message="The pynvml package is deprecated", category=FutureWarning
)
