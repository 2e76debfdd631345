"""The exact estimator lab: enumerable autoregressive policies, controlled behaviour-policy
mismatch, and the exact bias / variance of every objective's gradient estimator (issue 5)."""
