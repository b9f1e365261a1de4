"""How work runs on the cluster: connecting to Ray (cluster.py), Ray Train on the driver and in the
workers (ray_train.py), torch.distributed collectives (collective.py) and DeepSpeed (engine.py).
Models, losses and evaluation never import any of them."""
