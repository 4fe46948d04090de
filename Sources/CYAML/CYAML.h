// libyaml (Debian: libyaml-dev), as Swift imports it.
#include <yaml.h>
