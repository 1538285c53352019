"""vfmtok.evaluation: metrics, FID, reconstruction metrics, the benchmark, the Inception weights, speed."""
