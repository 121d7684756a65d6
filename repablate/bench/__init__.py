"""repablate.bench -- what re-parameterization costs and saves: params, FLOPs, memory traffic, latency, op audit."""
