"""New music from a trained GPT: sampling, the decoding loop, prompts, grammar repair,
composing pieces and rendering them (MIDI, piano roll, audio)."""
