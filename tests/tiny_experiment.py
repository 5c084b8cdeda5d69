"""The TOML blocks the training CLI tests share: 2.5D preprocessing of 32x32 phantoms and 2-shard convert.

Each test file adds its own name, model, fit and evaluate tables around these.
"""

PREPROCESS_25D = """
[preprocess]
mode = "2.5d"
input_shape = [32, 32]
context_slices = 1
target_spacing = [6.0, 9.0, 9.0]
resample_z = true
windows = [{center = -600, width = 1500}]
"""

CONVERT = """
[convert]
shards = 2
"""

CONVERT_SAMPLES = CONVERT + """[convert.samples]
negative_slice_stride = 2
"""
