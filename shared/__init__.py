"""What every relayrl service imports: messages, subjects, bus, config, telemetry."""
