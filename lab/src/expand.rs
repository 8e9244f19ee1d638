//! Variable expansion, as containerlab does it.
//!
//! Two kinds of variables exist in a topology file:
//! - environment variables, expanded in the raw file text before it is parsed (`$VAR`,
//!   `${VAR}`, `${VAR:=default}`, `${VAR:-default}`, `${VAR=default}`, `${VAR-default}`;
//!   `$$` stands for a literal `$`, so `exec` lines can keep shell variables);
//! - magic variables (`__clabNodeName__`, `__clabNodeDir__`, `__clabDir__`,
//!   `__clabLabName__`), replaced per node in binds, exec, cmd and env values.
//!
//! This module only transforms strings; it reads no environment of its own (the caller passes a
//! lookup) so that tests can run in parallel without touching the process environment.

use std::collections::HashMap;
use std::path::Path;

/// An expansion that cannot be completed, with the 1-based line where it starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ExpandError {
    pub line: usize,
    pub reason: String,
}

/// Expands environment variables in `input`, bash/envsubst style.
///
/// An unset variable without a default expands to the empty string (containerlab's behaviour).
/// `${VAR:=default}` also assigns the default, so later `${VAR}` in the same file see it.
pub fn expand_env(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let mut assigned: HashMap<String, String> = HashMap::new();
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    let mut line = 1usize;
    while let Some(pos) = rest.find('$') {
        let (before, after) = rest.split_at(pos);
        line += before.matches('\n').count();
        out.push_str(before);
        let after = &after[1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = closing_brace(body).ok_or_else(|| ExpandError {
                line,
                reason: "unterminated '${' (write '$$' for a literal '$')".to_string(),
            })?;
            let expr = &body[..end];
            let value = braced(expr, line, lookup, &mut assigned)?;
            line += expr.matches('\n').count();
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            let len = name_len(after);
            if len == 0 {
                out.push('$');
                rest = after;
            } else {
                let name = &after[..len];
                out.push_str(&get(name, lookup, &assigned).unwrap_or_default());
                rest = &after[len..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Index of the `}` that closes a `${` whose body starts at `body[0]`, allowing nested `${}` in
/// defaults.
fn closing_brace(body: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn name_len(s: &str) -> usize {
    let mut len = 0;
    for (i, c) in s.char_indices() {
        let ok = c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit());
        if !ok {
            break;
        }
        len = i + c.len_utf8();
    }
    len
}

fn get(
    name: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    assigned: &HashMap<String, String>,
) -> Option<String> {
    lookup(name).or_else(|| assigned.get(name).cloned())
}

fn braced(
    expr: &str,
    line: usize,
    lookup: &dyn Fn(&str) -> Option<String>,
    assigned: &mut HashMap<String, String>,
) -> Result<String, ExpandError> {
    let len = name_len(expr);
    if len == 0 {
        return Err(ExpandError {
            line,
            reason: format!("'${{{expr}}}' does not start with a variable name"),
        });
    }
    let (name, op) = expr.split_at(len);
    let value = get(name, lookup, assigned);
    // The default may itself contain variables.
    let default =
        |d: &str, assigned: &mut HashMap<String, String>| -> Result<String, ExpandError> {
            let lookup2 = |n: &str| get(n, lookup, assigned);
            expand_env(d, &lookup2)
        };
    let result = match op {
        "" => value.unwrap_or_default(),
        _ if op.starts_with(":=") || op.starts_with(":-") => match value {
            Some(v) if !v.is_empty() => v,
            _ => {
                let d = default(&op[2..], assigned)?;
                if op.starts_with(":=") {
                    assigned.insert(name.to_string(), d.clone());
                }
                d
            }
        },
        _ if op.starts_with('=') || op.starts_with('-') => match value {
            Some(v) => v,
            None => {
                let d = default(&op[1..], assigned)?;
                if op.starts_with('=') {
                    assigned.insert(name.to_string(), d.clone());
                }
                d
            }
        },
        _ => {
            return Err(ExpandError {
                line,
                reason: format!(
                    "unsupported expansion '${{{expr}}}' (supported: ${{VAR}}, ${{VAR:=default}}, \
                     ${{VAR:-default}}, ${{VAR=default}}, ${{VAR-default}})"
                ),
            });
        }
    };
    Ok(result)
}

/// The per-node values of containerlab's magic variables.
#[derive(Debug, Clone)]
pub struct Magic<'a> {
    pub lab: &'a str,
    pub lab_dir: &'a Path,
    pub node: &'a str,
}

impl Magic<'_> {
    /// Replaces every magic variable in `s`.
    pub fn apply(&self, s: &str) -> String {
        if !s.contains("__clab") {
            return s.to_string();
        }
        let lab_dir = self.lab_dir.display().to_string();
        let node_dir = self.lab_dir.join(self.node).display().to_string();
        s.replace("__clabNodeDir__", &node_dir)
            .replace("__clabDir__", &lab_dir)
            .replace("__clabNodeName__", self.node)
            .replace("__clabLabName__", self.lab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn plain_braced_and_defaults() {
        let e = env(&[("A", "x"), ("EMPTY", "")]);
        assert_eq!(expand_env("$A-${A}", &e).unwrap(), "x-x");
        assert_eq!(expand_env("${B:=dflt}/${B}", &e).unwrap(), "dflt/dflt");
        assert_eq!(expand_env("${B:-d1}/${B}", &e).unwrap(), "d1/");
        assert_eq!(expand_env("${EMPTY:-d}|${EMPTY-d}", &e).unwrap(), "d|");
        assert_eq!(expand_env("${A:=unused}", &e).unwrap(), "x");
        assert_eq!(expand_env("${UNSET}", &e).unwrap(), "");
    }

    #[test]
    fn dollar_escapes_and_literals() {
        let e = env(&[("HOME", "/root")]);
        assert_eq!(expand_env("echo $$HOME", &e).unwrap(), "echo $HOME");
        assert_eq!(
            expand_env("cost: 5$ and $1", &e).unwrap(),
            "cost: 5$ and $1"
        );
        assert_eq!(expand_env("a$", &e).unwrap(), "a$");
    }

    #[test]
    fn nested_default() {
        let e = env(&[("P", "pre")]);
        assert_eq!(expand_env("${N:=${P}-lab}", &e).unwrap(), "pre-lab");
    }

    #[test]
    fn errors_name_the_line() {
        let e = env(&[]);
        let err = expand_env("a: 1\nb: ${OOPS\n", &e).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.reason.contains("unterminated"));
        let err = expand_env("x\n\ny: ${A/b}", &e).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(expand_env("${}", &e).is_err());
    }

    #[test]
    fn magic_variables() {
        let m = Magic {
            lab: "lab1",
            lab_dir: Path::new("/w/clab-lab1"),
            node: "r1",
        };
        assert_eq!(
            m.apply("__clabDir__/x:__clabNodeDir__/y:__clabNodeName__:__clabLabName__"),
            "/w/clab-lab1/x:/w/clab-lab1/r1/y:r1:lab1"
        );
    }
}
