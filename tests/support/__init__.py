"""What the tests share and no test module owns: procedural MIDI, datasets prepared and read
back, the apps and trainings started as a user starts them, real servers on loopback."""
