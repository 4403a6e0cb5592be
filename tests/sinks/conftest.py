from tests.mosquitto import mosquitto

__all__ = ["mosquitto"]  # re-exported as a fixture for the tests here
