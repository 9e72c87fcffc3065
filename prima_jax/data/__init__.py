"""M⁴Seg data: record format, synthetic benchmark, TFDS builder, tokenisers, Grain pipeline."""
