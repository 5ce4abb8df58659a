"""The method: gist masks, canonical prefixes, attention hooks, HyperLlama, whole-LM trainees, distillation, scoring.

Imports run one way: core <- models <- data <- train <- course <- cli. Nothing here imports a later layer."""
