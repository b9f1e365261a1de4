"""Everything that knows Ray Train (ray_train.py) and DeepSpeed (engine.py); models and losses never do."""
