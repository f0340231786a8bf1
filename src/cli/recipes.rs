//! `vae train --recipe NAME`: each tutorial this project grew from, as the flags that train
//! what it trains. A recipe is only flags: they are put in front of the command line's own,
//! so any flag given besides the recipe overrides it (clap's `args_override_self`), and
//! run.json records the expanded settings. `tests/recipes.rs` checks every recipe's model,
//! objective and first Adam step against a PyTorch twin of the tutorial's own code.

use std::ffi::OsString;

/// One tutorial's settings.
pub struct Recipe {
    /// The name after `--recipe`.
    pub name: &'static str,
    /// The tutorial, in a few words, and where its code is.
    pub tutorial: &'static str,
    /// The flags it stands for.
    pub flags: &'static [&'static str],
    /// What still differs from the tutorial, and why.
    pub differs: &'static str,
}

/// Every recipe, in the order `--recipe list` prints them.
pub const RECIPES: &[Recipe] = &[
    Recipe {
        name: "mlp",
        tutorial: "the MLP VAE (pytorch/examples' vae/main.py; the iThome day-23 tutorial)",
        flags: &[
            "--arch",
            "mlp",
            "--hidden",
            "400",
            "--latent",
            "20",
            "--recon",
            "bce",
            "--batch-size",
            "128",
            "--lr",
            "1e-3",
            "--epochs",
            "10",
        ],
        differs: "nothing: these are vae train's defaults",
    },
    Recipe {
        name: "conv",
        tutorial: "the conv VAE tutorial (convs of 32, 64, 128 channels, 256 features, z = 20)",
        flags: &[
            "--arch",
            "conv",
            "--latent",
            "20",
            "--recon",
            "bce",
            "--batch-size",
            "128",
            "--lr",
            "1e-3",
            "--epochs",
            "10",
        ],
        differs: "nothing",
    },
    Recipe {
        name: "lightning-mlp",
        tutorial: "the PyTorch Lightning MLP VAE (hidden 256, z = 2; Kaggle marquis03/vae-mnist)",
        flags: &[
            "--arch",
            "mlp",
            "--hidden",
            "256",
            "--latent",
            "2",
            "--recon",
            "bce",
            "--batch-size",
            "64",
            "--lr",
            "1e-3",
            "--betas",
            "0.9,0.99",
            "--eps",
            "1e-8",
            "--weight-decay",
            "1e-5",
            "--monitor",
            "train",
            "--patience",
            "5",
            "--epochs",
            "10",
        ],
        differs: "metrics.csv has its CSVLogger's loss, BCE_loss and KLD_loss columns beside ours; `vae manifold` \
                  draws z2 increasing upwards (+1.64 on the top row, as its axis label says), where the tutorial's \
                  grid has -1.64 there",
    },
    Recipe {
        name: "mnist-conv-bn",
        tutorial: "the conv + batch-norm MNIST tutorial (eugeniaring/Pytorch-tutorial, VAE_mnist.ipynb)",
        flags: &[
            "--arch",
            "conv-bn-mnist",
            "--latent",
            "4",
            "--recon",
            "mse",
            "--batch-size",
            "256",
            "--lr",
            "1e-3",
            "--weight-decay",
            "1e-5",
            "--epochs",
            "50",
            "--holdout",
            "12000",
            "--epoch-reconstructions",
        ],
        differs: "the KL is the Gaussian KL, sum(sigma^2/2 + mu^2/2 - log sigma - 1/2); the notebook's \
                  (sigma^2 + mu^2 - log sigma - 1/2).sum() is not a KL divergence: it weighs sigma^2 and mu^2 \
                  twice, so its minimum is at sigma = 1/sqrt(2), not at the prior; the held-out 12,000 are \
                  chosen by --seed, not by torch's generator",
    },
    Recipe {
        name: "celeba",
        tutorial: "the CelebA conv + batch-norm VAE (SingleZombie/DL-Demos, dldemos/VAE; needs --data CELEBA_DIR)",
        flags: &[
            "--arch",
            "conv-bn",
            "--param-names",
            "dldemos",
            "--hiddens",
            "16,32,64,128,256",
            "--latent",
            "128",
            "--output-activation",
            "relu",
            "--image-size",
            "64",
            "--crop",
            "168",
            "--celeba-train",
            "all",
            "--recon",
            "mse",
            "--recon-reduction",
            "mean",
            "--kl-reduction",
            "batch-mean",
            "--kl-weight",
            "0.00025",
            "--lr",
            "0.005",
            "--batch-size",
            "16",
            "--epochs",
            "10",
        ],
        differs: "resizing is the image crate's triangle filter, close to but not bit-for-bit PIL's bilinear; \
                  the test set (partition 2) is evaluated each epoch although the tutorial trains on it too",
    },
];

/// The recipe called `name`.
pub fn find(name: &str) -> Option<&'static Recipe> {
    RECIPES.iter().find(|r| r.name == name)
}

/// What the command line asks for once recipes are expanded.
pub enum Expanded {
    /// Arguments for clap: `vae [global flags] train <recipe flags> <the user's flags>`.
    Args(Vec<OsString>),
    /// `vae train --recipe list`.
    List,
}

/// Puts the flags of the recipe named by `train --recipe NAME` (or `--recipe=NAME`) right
/// after `train`, in front of the user's own, which therefore win. `--recipe NAME` stays on
/// the line, so the settings record it. Other command lines pass through untouched.
pub fn expand(args: Vec<OsString>) -> Result<Expanded, String> {
    let Some(train) = train_position(&args) else { return Ok(Expanded::Args(args)) };
    let mut name = None;
    let mut i = train + 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--recipe" {
            name = args.get(i + 1).map(|v| v.to_string_lossy().into_owned());
            if name.is_none() {
                return Err("--recipe needs a name (vae train --recipe list shows them)".into());
            }
            i += 1;
        } else if let Some(v) = a.strip_prefix("--recipe=") {
            name = Some(v.to_string());
        }
        i += 1;
    }
    let Some(name) = name else { return Ok(Expanded::Args(args)) };
    if name == "list" {
        return Ok(Expanded::List);
    }
    let recipe = find(&name).ok_or_else(|| {
        let names: Vec<&str> = RECIPES.iter().map(|r| r.name).collect();
        format!(
            "unknown recipe {name:?}: the recipes are {} (vae train --recipe list shows their flags)",
            names.join(", ")
        )
    })?;
    let mut out = args[..=train].to_vec();
    out.extend(recipe.flags.iter().map(OsString::from));
    out.extend(args[train + 1..].iter().cloned());
    Ok(Expanded::Args(out))
}

/// Where the `train` subcommand stands, if the command is `vae [--device D] train ...`.
fn train_position(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--device" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return (a == "train").then_some(i);
        }
    }
    None
}

/// The `--recipe list` table: each recipe, its tutorial, its flags and what differs.
pub fn list() -> String {
    let mut out = String::from("recipes for vae train --recipe NAME (flags given besides it override the recipe's):\n");
    for r in RECIPES {
        out += &format!("\n{:<14} {}\n{:<14} {}\n", r.name, r.tutorial, "", r.flags.join(" "));
        out += &format!("{:<14} differs: {}\n", "", r.differs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }
    fn strings(e: Expanded) -> Vec<String> {
        match e {
            Expanded::Args(a) => a.into_iter().map(|s| s.into_string().unwrap()).collect(),
            Expanded::List => vec!["LIST".into()],
        }
    }

    #[test]
    fn a_recipe_goes_in_front_of_the_users_flags() {
        let e = strings(expand(args("vae --device cpu train --recipe conv --epochs 3")).unwrap());
        let recipe: Vec<String> = find("conv").unwrap().flags.iter().map(|s| s.to_string()).collect();
        assert_eq!(e[..4], ["vae", "--device", "cpu", "train"]);
        assert_eq!(e[4..4 + recipe.len()], recipe[..]);
        assert_eq!(e[4 + recipe.len()..], ["--recipe", "conv", "--epochs", "3"]);
        assert_eq!(strings(expand(args("vae train --recipe=list")).unwrap()), ["LIST"]);
        // Other commands, and train without a recipe, pass through untouched.
        for line in ["vae eval --checkpoint x --recipe conv", "vae train --epochs 2", "vae --help"] {
            assert_eq!(
                strings(expand(args(line)).unwrap()),
                args(line).iter().map(|s| s.to_string_lossy()).collect::<Vec<_>>()
            );
        }
        let e = expand(args("vae train --recipe nope")).err().unwrap();
        assert!(e.contains("unknown recipe \"nope\"") && e.contains("celeba"), "{e}");
    }
}
