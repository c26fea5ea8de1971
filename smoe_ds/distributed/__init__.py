"""Process groups and what runs across them: start-up, the watchdog, fault injection, expert
placement, ZeRO-3 tagging, and what each rank holds."""
