"""Training small CNNs on CIFAR-10/100: configs, data, bricks and an ignite main loop."""
