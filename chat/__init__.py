"""The chat core: settings, storage, agent and server-owned runs. No HTML lives here."""
