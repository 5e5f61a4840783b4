//! Closed sets of choices in the job file: each is an enum written as a lowercase string
//! (`kind = "moco"`), so a typo fails at parse time with the allowed names and the worker
//! matches variants, never strings.

/// Declares a string-valued choice: the enum, its names, `Display`/`FromStr`, and serde as a
/// string ([`serde_via_str`]). A wrong name is rejected as `("lamb") must be one of "sgd", "lars", "adamw"`, which
/// the loader prefixes with the key path.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        pub enum $name:ident default $default:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every choice, in the order the docs list them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used in the job file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err(format!(
                        "(\"{other}\") must be one of {}",
                        $crate::config::choice::quoted(Self::ALL.iter().map(|c| c.as_str()))
                    )),
                }
            }
        }

        $crate::config::choice::serde_via_str!($name);
    };
}
pub(crate) use choice;

/// Serde for a type written in the job file as one string: out through `Display`, in through
/// `FromStr`, whose error message follows the key path.
macro_rules! serde_via_str {
    ($name:ty) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use serde_via_str;

/// `"a", "b", "c"`: the allowed names in an error message.
pub(crate) fn quoted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    choice! {
        /// A test choice.
        pub enum Fruit default Pear {
            Apple = "apple",
            Pear = "pear",
        }
    }

    #[test]
    fn names_round_trip_and_wrong_names_list_the_choices() {
        for f in Fruit::ALL {
            assert_eq!(f.as_str().parse::<Fruit>().unwrap(), *f);
        }
        assert_eq!(Fruit::default(), Fruit::Pear);
        let e = "plum".parse::<Fruit>().unwrap_err();
        assert_eq!(e, "(\"plum\") must be one of \"apple\", \"pear\"");
        #[derive(serde::Deserialize, serde::Serialize)]
        struct T {
            f: Fruit,
        }
        let t: T = toml::from_str("f = \"apple\"").unwrap();
        assert_eq!(t.f, Fruit::Apple);
        assert_eq!(toml::to_string(&t).unwrap().trim(), "f = \"apple\"");
        let e = toml::from_str::<T>("f = \"fig\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("must be one of \"apple\", \"pear\""), "{e}");
    }
}
