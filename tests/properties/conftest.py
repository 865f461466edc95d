# The Hypothesis profiles (``ci`` by default, ``long`` by HYPOTHESIS_PROFILE=long) are
# registered and loaded by tests.properties.support, on import.
import tests.properties.support  # noqa: F401
