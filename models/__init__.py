"""The torch customer model: PinnerFormer-style user tower over MCM heterogeneous events.

- config.py: ModelConfig, TrainConfig (their bounds, checked when the configuration loads)
- data.py: per-user sequences, splits, left-padded batches; in-memory training sources
- features.py: event featurisation (item, categories, brand, event type, surface, duration, time gaps)
- encoder.py: pre-norm causal transformer -> output MLP -> L2-normalised user embedding
- item_tower.py: item id + content -> L2-normalised item vector (works for unseen items)
- heads.py: MCM task-aware attentional readout (preference scores per task)
- losses.py: sampled softmax with logQ + mixed negatives, full softmax, next-action / dense all-action
- metrics.py: full-catalogue HR/NDCG@10, coverage@10, entropy@50
- train.py: training loop, evaluation, checkpoints
- grow.py: grow id-indexed tables for ids added since a model was trained
- model.py: the two towers and the heads as one module
"""
