"""Everything that imports Ray Serve: the expert and router deployments, the app builder,
and the embedded local cluster behind `moe-cluster serve`."""

import warnings

# Arrays that arrive through Ray's object store are read-only and we only read them;
# torch.from_numpy warns about that on every replica otherwise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
