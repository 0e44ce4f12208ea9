"""The trainer's data: shards dealt to streams, the streaming loader, packing, augmentation and
the infilling arrangement."""
